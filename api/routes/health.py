"""/healthz (the process is up) and /readyz (database and broker reachable)."""

from __future__ import annotations

from flask import Response, jsonify
from flask_openapi3 import APIBlueprint, Tag
from sqlalchemy import text

from api.dispatch import BROKER_ERRORS, broker_reachable
from shared.db import get_engine

bp = APIBlueprint("health", __name__, abp_tags=[Tag(name="health")])


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["database"] = f"{type(exc).__name__}: {exc}"
    try:
        broker_reachable()
        checks["broker"] = "ok"
    except BROKER_ERRORS as exc:
        checks["broker"] = f"{type(exc).__name__}: {exc}"
    ready = all(v == "ok" for v in checks.values())
    response = jsonify({"status": "ready" if ready else "not ready", "checks": checks})
    response.status_code = 200 if ready else 503
    return response
