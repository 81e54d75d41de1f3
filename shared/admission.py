"""Admitting a clone request: what the API does between authentication and the publish, in two
reads and one write (on PostgreSQL one statement writes both rows and commits by itself). It
answers what the request can be told at once -- a source that does not exist or is not running, a
name taken, a host or node it names that does not exist, options that do not fit the source's
nodes, disk that no host has -- and writes two rows:
the job and its target environment (whose unique name reserves it).

The rest (addresses, clone nodes, steps) is the start task's: ``planning.materialize_clone`` on a
worker. A request used to do it all, and it cost most of the request's CPU; what only exact
allocation can find (an address pool run dry since) now fails the job with the conflict's code."""

from __future__ import annotations

import secrets
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Insert, bindparam, insert, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from shared import placement
from shared.clone import masking, neutralize
from shared.errors import Conflict, PlanError, Problem
from shared.models import CloneJob, Environment, Host, Node, new_id, row_values
from shared.states import EnvState

# Built once: every clone request runs them, and building a statement costs about as much as
# running it; of table columns, so they take Core's execution path, not the ORM's. One statement
# reads the source, its nodes, their hosts (all that placement reads unless the request moves a
# node or its host is full) and whether the target name is taken.
_ENVS, _NODES, _HOST = Environment.__table__.c, Node.__table__.c, Host.__table__.c
_SOURCE_AND_NODES = (
    select(_ENVS.id, _ENVS.name.label("env_name"), _ENVS.state, _ENVS.egress, _ENVS.on_clone,
           _NODES.name, _NODES.stack, _NODES.host, _NODES.size_bytes,
           *(c.label(f"host_{c.name}") for c in placement.HOST_COLUMNS))
    .select_from(Environment.__table__)
    .outerjoin(Node.__table__, (_NODES.environment_id == _ENVS.id) & (_ENVS.name == bindparam("source")))
    .outerjoin(Host.__table__, _HOST.name == _NODES.host)
    .where(_ENVS.tenant == bindparam("tenant"), _ENVS.name.in_(bindparam("names", expanding=True)))
    .order_by(_NODES.name))
_INSERT_ENV = insert(Environment.__table__)
_INSERT_JOB = insert(CloneJob.__table__)


@lru_cache(maxsize=8)
def _insert_both(target_keys: tuple[str, ...], job_keys: tuple[str, ...]) -> Insert:
    """INSERT of the job WITH the INSERT of its target, both of bound parameters (``t_<column>``,
    ``j_<column>``): built once per set of columns, as building it cost more than running it."""
    envs, jobs = Environment.__table__, CloneJob.__table__
    target = insert(envs).values({k: bindparam(f"t_{k}", type_=envs.c[k].type) for k in target_keys})
    return insert(jobs).values({k: bindparam(f"j_{k}", type_=jobs.c[k].type) for k in job_keys}
                               ).add_cte(target.cte("target"))


def _write(db: Session | Connection, target: dict[str, Any], job: dict[str, Any]) -> None:
    """The two rows; on PostgreSQL in one statement (a data-modifying CTE), one round trip that is
    atomic by itself, so the API needs no BEGIN and COMMIT for it. SQLite has no such CTE."""
    dialect = db.get_bind().dialect if isinstance(db, Session) else db.dialect
    if dialect.name == "postgresql":
        db.execute(_insert_both(tuple(target), tuple(job)),
                   {**{f"t_{k}": v for k, v in target.items()}, **{f"j_{k}": v for k, v in job.items()}})
    else:
        db.execute(_INSERT_ENV, target)
        db.execute(_INSERT_JOB, job)


def admit_clone(session: Session | Connection, tenant: str, source_name: str, target_name: str, options: dict[str, Any],
                idempotency: tuple[str | None, str | None] = (None, None)) -> tuple[CloneJob, Environment]:
    """Check the request against the rows and write its job and target environment (the caller
    commits: a Session, or a Connection such as ``shared.db.autocommit``'s, whose reads each see the
    latest rows and whose write of both rows is one statement);
    both are returned as transient objects holding what was written (not in the session).
    ``options["on_clone"]``: the request's actions, run after the source environment's own;
    ``options["mask"]``: masking rules (``shared.clone.masking``), with ``mask_seed``."""
    rows = session.execute(_SOURCE_AND_NODES, {"tenant": tenant, "source": source_name,
                                               "names": [source_name, target_name]}).all()
    source = next((r for r in rows if r.env_name == source_name), None)
    if source is None:
        raise PlanError(Conflict("not_found", f"environment {source_name!r} does not exist", "source"),
                        Problem.NOT_FOUND)
    if source.state != EnvState.RUNNING:
        raise PlanError(Conflict("source_not_running", f"environment {source_name!r} is {source.state}", "source"))
    if any(r.env_name == target_name for r in rows):
        raise PlanError(Conflict("name_taken", f"environment {target_name!r} already exists", "name"))
    nodes = [r for r in rows if r.env_name == source_name and r.name is not None]
    stacks = {n.name: n.stack for n in nodes}
    neutralize.check(options.get("on_clone", []), stacks, "on_clone")
    masking.check(options.get("mask", []), stacks, "mask")
    read = [placement.HostRow(*(getattr(n, f"host_{c.name}") for c in placement.HOST_COLUMNS))
            for n in nodes if n.host_name is not None]
    where, hosts = placement.place_clone(session, nodes, options.get("target_host"), options.get("placement") or {},
                                         read)
    for host in sorted(set(where.values())):
        if hosts.known and hosts.free(host) < 0:
            raise PlanError(Conflict("disk_full", f"host {host}: needs {hosts.promised[host]} bytes of disk, "
                                     f"{hosts.free(host) + hosts.promised[host]} free", "name"))
    options = {**options, "on_clone": [*source.on_clone, *options.get("on_clone", [])]}
    if options.get("mask") and not options.get("mask_seed"):
        # Random per job: another clone gets other fakes. Kept here, never shown in a response.
        options["mask_seed"] = secrets.token_hex(16)
    # The clone reaches what its source may reach (the same configuration), never the source itself:
    # its fence admits its own nodes' addresses, not the source's. A clone of it is neutralized alike.
    target_values = row_values(Environment, id=new_id(), tenant=tenant, name=target_name,
                               source_environment_id=source.id, egress=list(source.egress),
                               on_clone=list(source.on_clone))
    job_values = row_values(CloneJob, id=new_id(), tenant=tenant, source_environment_id=source.id,
                            source_name=source_name, target_name=target_name,
                            target_environment_id=target_values["id"], options=options,
                            idempotency_key=idempotency[0], request_hash=idempotency[1])
    # Core inserts, not the unit of work: its flush was the largest part of a request's CPU.
    _write(session, target_values, job_values)
    # The rows as written, for the response; nothing below the job exists yet, and says so.
    job, target = CloneJob(**job_values), Environment(**target_values)
    set_committed_value(job, "nodes", [])
    set_committed_value(job, "steps", [])
    return job, target
