"""/v1/hosts: the machines that hold nodes, as their agents last reported them."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import select

from api import serialize
from api.auth import authenticate
from api.schemas import ErrorOut, HostList
from shared.db import session_scope
from shared.hosts import node_counts
from shared.models import Host

bp = APIBlueprint("hosts", __name__, url_prefix="/v1", abp_tags=[Tag(name="hosts")],
                  abp_security=[{"bearer": []}], abp_responses={401: ErrorOut})
bp.before_request(authenticate)


@bp.get("/hosts", responses={200: HostList})
def list_hosts() -> Response:
    """Every host: state (up, down, draining), nodes it holds, free disk, reflink."""
    with session_scope() as session:
        counts = node_counts(session)
        items = [{"name": h.name, "state": h.state, "nodes": counts.get(h.name, 0), "free_bytes": h.free_bytes,
                  "reflink": h.reflink, "heartbeat_at": h.heartbeat_at}
                 for h in session.scalars(select(Host).order_by(Host.name))]
    return jsonify(serialize.to_json(HostList.model_validate({"items": items})))
