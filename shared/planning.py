"""Turning a request into rows, in the caller's transaction: environments with their nodes and
leases; clone jobs with their target environment, nodes, leases and one StepRun per step. The API
calls this (then commits and enqueues); so do tests. Conflicts are collected, not thrown one by one,
so a dry run can list them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from shared import admission, ipam, placement, templates
from shared.clone import neutralize
from shared.errors import Conflict, PlanError, Problem
from shared.models import CloneJob, Environment, JobNode, Node, StepRun, new_id
from shared.stacks import CATALOG
from shared.states import CLONE_STEPS, JOB_DONE, EnvState


@dataclass
class NodeRequest:
    name: str
    stack: str
    config: dict[str, str] = field(default_factory=dict)
    host: str | None = None  # pinned by the request; else placement chooses


def _lease_by_host(session: Session, hosts: placement.Hosts, wanted: list[str], *, job_id: str | None = None,
                   busy: set[str] | None = None, node_ids: list[str] | None = None, field: str = "nodes",
                   dry: bool = False) -> list[str]:
    """An address per node from its host's pool (``wanted[i]``: node i's host), in node order."""
    out: list[str | None] = [None] * len(wanted)
    for host in sorted(set(wanted)):
        idx = [i for i, h in enumerate(wanted) if h == host]
        pool = placement.pool_of(hosts, host)
        try:
            got = (ipam.plan(session, pool, len(idx), busy=busy) if dry else
                   ipam.lease(session, pool, len(idx), job_id=job_id, busy=busy,
                              node_ids=[node_ids[i] for i in idx] if node_ids else None))
        except ipam.PoolExhausted as exc:
            raise PlanError(Conflict("pool_exhausted", f"host {host}: {exc}", field)) from None
        for i, address in zip(idx, got, strict=True):
            out[i] = address
    return [a for a in out if a is not None]


def find_environment(session: Session, tenant: str, name: str) -> Environment | None:
    return session.scalar(select(Environment).where(Environment.tenant == tenant, Environment.name == name))


def active_job(session: Session, environment_id: str) -> CloneJob | None:
    """A job still running that reads or writes this environment."""
    return session.scalar(
        select(CloneJob).where(
            (CloneJob.source_environment_id == environment_id) | (CloneJob.target_environment_id == environment_id),
            CloneJob.state.not_in(JOB_DONE),
        ).limit(1)
    )


def plan_environment(session: Session, tenant: str, name: str, nodes: list[NodeRequest],
                     egress: list[dict[str, Any]] | None = None,
                     on_clone: list[dict[str, Any]] | None = None) -> Environment:
    """``on_clone``: actions every clone of it runs before it is reachable (shared.clone.neutralize)."""
    if find_environment(session, tenant, name) is not None:
        raise PlanError(Conflict("name_taken", f"environment {name!r} already exists", "name"))
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise PlanError(Conflict("duplicate_node", "node names must be unique", "nodes"), Problem.INVALID)
    deps: dict[str, set[str]] = {}
    for i, node in enumerate(nodes):
        if node.stack not in CATALOG:
            raise PlanError(Conflict("unknown_stack", f"unknown stack {node.stack!r}; known: "
                                     f"{', '.join(sorted(CATALOG))}", f"nodes[{i}].stack"), Problem.INVALID)
        refs = templates.references(node.config)
        if node.name in refs:  # its own URL does not exist until it is made: it would wait forever
            raise PlanError(Conflict("self_reference", f"node {node.name!r} references itself in its config",
                                     f"nodes[{i}].config"), Problem.INVALID)
        unknown = refs - set(names)
        if unknown:
            raise PlanError(Conflict("unknown_reference", f"config references unknown node(s) "
                                     f"{', '.join(sorted(unknown))}", f"nodes[{i}].config"), Problem.INVALID)
        deps[node.name] = refs
    try:
        templates.creation_levels(deps)
    except ValueError as exc:
        raise PlanError(Conflict("reference_cycle", str(exc), "nodes"), Problem.INVALID) from None
    neutralize.check(on_clone or [], {n.name: n.stack for n in nodes}, "on_clone")
    env = Environment(tenant=tenant, name=name, egress=list(egress or []), on_clone=list(on_clone or []))
    session.add(env)
    hosts = placement.Hosts(session)
    where = placement.place_new(session, [n.host for n in nodes])
    addresses = _lease_by_host(session, hosts, where)
    for node, address, host in zip(nodes, addresses, where, strict=True):
        stack = CATALOG[node.stack]
        credentials = stack.new_credentials()
        row = Node(id=new_id(), name=node.name, stack=node.stack, address=address, port=stack.default_port,
                   config=dict(node.config), credentials=credentials, host=host,
                   url=stack.url(address, stack.default_port, credentials, secret=False))
        env.nodes.append(row)
        ipam.bind(session, address, row.id)
    session.flush()
    return env


LISTENER_SCAN_MAX_AGE_S = 1.0  # clone requests in the same second share one scan of /proc/net/tcp


@dataclass
class ClonePlan:
    source: Environment | None
    target_name: str
    addresses: dict[str, str]  # source node name -> planned clone address
    conflicts: list[Conflict]
    bytes_needed: int = 0
    bytes_free: int = 0
    reflink: bool = False
    busy: set[str] = field(default_factory=set)  # addresses something listens on, read once
    hosts: dict[str, str] = field(default_factory=dict)  # source node name -> the clone node's host
    host_rows: placement.Hosts | None = None


def check_clone(session: Session, tenant: str, source_name: str, target_name: str,
                target_host: str | None = None, pins: dict[str, str] | None = None,
                own_target: str | None = None) -> ClonePlan:
    """Everything a clone needs, checked without writing anything. A request that names a host
    that does not exist is refused (PlanError); what the current state does not allow is listed.
    ``own_target``: the id of the target environment the job being planned already holds."""
    conflicts: list[Conflict] = []
    named = {e.name: e for e in session.scalars(select(Environment).where(
        Environment.tenant == tenant, Environment.name.in_({source_name, target_name})))}
    source = named.get(source_name)
    if source is None:
        raise PlanError(Conflict("not_found", f"environment {source_name!r} does not exist", "source"),
                        Problem.NOT_FOUND)
    if source.state != EnvState.RUNNING:
        conflicts.append(Conflict("source_not_running", f"environment {source_name!r} is {source.state}", "source"))
    if target_name in named and named[target_name].id != own_target:
        conflicts.append(Conflict("name_taken", f"environment {target_name!r} already exists", "name"))
    try:
        where, hosts = placement.place_clone(session, source.nodes, target_host, pins or {})
    except PlanError as exc:
        if exc.problem != Problem.CONFLICT:
            raise
        conflicts.append(exc.conflict)
        return ClonePlan(source, target_name, {}, conflicts)
    addresses: dict[str, str] = {}
    # Read once: the leases and the listening addresses; plan_clone leases from the same reading.
    busy = ipam.listening_addresses(max_age_s=LISTENER_SCAN_MAX_AGE_S) | ipam.leased(session)
    try:
        planned = _lease_by_host(session, hosts, [where[n.name] for n in source.nodes], busy=busy, dry=True)
        addresses = {n.name: a for n, a in zip(source.nodes, planned, strict=True)}
    except PlanError as exc:
        conflicts.append(exc.conflict)
    # Sizes and disks as the agents last measured them: a plan reads rows, never a disk.
    needed = sum(hosts.promised.values())
    free = sum(hosts.free(h) + hosts.promised.get(h, 0) for h in set(where.values())) if hosts.known else 0
    for host in sorted(set(where.values())):
        if hosts.known and hosts.free(host) < 0:
            conflicts.append(Conflict("disk_full", f"host {host}: needs {hosts.promised[host]} bytes of disk, "
                                      f"{hosts.free(host) + hosts.promised[host]} free", "name"))
    reflink = hosts.known and all(hosts.rows[h].reflink for h in set(where.values()) if h in hosts.rows)
    return ClonePlan(source, target_name, addresses, conflicts, needed, free, reflink, busy, where, hosts)


def plan_clone(session: Session, tenant: str, source_name: str, target_name: str,
               options: dict[str, Any], idempotency: tuple[str | None, str | None] = (None, None)) -> CloneJob:
    """A job as a request admits it and its start task completes it, in the caller's transaction
    (for callers that want the whole plan at once; the API admits only)."""
    admitted, _ = admission.admit_clone(session, tenant, source_name, target_name, options, idempotency)
    job = session.get_one(CloneJob, admitted.id)
    materialize_clone(session, job)
    return job


def materialize_clone(session: Session, job: CloneJob) -> None:
    """Write an admitted job's clone nodes, their leases, job nodes and steps (caller commits). The
    state may have moved since the request was admitted: a PlanError names what no longer fits."""
    options = job.options
    plan = check_clone(session, job.tenant, job.source_name, job.target_name, options.get("target_host"),
                       options.get("placement"), own_target=job.target_environment_id)
    if plan.conflicts:
        raise PlanError(plan.conflicts[0])
    source = plan.source
    assert source is not None and plan.host_rows is not None
    sources = list(source.nodes)
    clone_ids = [new_id() for _ in sources]
    where = [plan.hosts[s.name] for s in sources]
    addresses = _lease_by_host(session, plan.host_rows, where, job_id=job.id, busy=plan.busy, node_ids=clone_ids,
                               field="name")
    # Rows are added by foreign key rather than through relationship lists: appending to a list
    # of a persistent object would load it first, a query per list.
    rows: list[object] = []
    for src, address, clone_id, host in zip(sources, addresses, clone_ids, where, strict=True):
        # A clone never shares a secret with its source: new credentials, set before it first listens.
        stack = CATALOG[src.stack]
        credentials = stack.new_credentials(src.credentials, rename_users=bool(options.get("rename_db_users")))
        rows.append(Node(id=clone_id, environment_id=job.target_environment_id, name=src.name, stack=src.stack,
                         address=address, port=src.port, host=host, config=dict(src.config), source_node_id=src.id,
                         credentials=credentials, url=stack.url(address, src.port, credentials, secret=False)))
        rows.append(JobNode(job_id=job.id, source_node_id=src.id, name=src.name, clone_node_id=clone_id,
                            snapshot_id=new_id()))
        rows += [StepRun(job_id=job.id, source_node_id=src.id, node_name=src.name, step=step, seq=seq)
                 for seq, step in enumerate(CLONE_STEPS)]
    session.add_all(rows)
    session.flush()
    # The job's node and step lists are what was just written: set as loaded, so a response built
    # from the job does not read them back.
    set_committed_value(job, "nodes", sorted((r for r in rows if isinstance(r, JobNode)), key=lambda n: n.name))
    set_committed_value(job, "steps", sorted((r for r in rows if isinstance(r, StepRun)),
                                             key=lambda s: (s.node_name, s.seq)))
