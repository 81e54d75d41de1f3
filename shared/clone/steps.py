"""The five clone steps of one source node: quiesce -> snapshot -> restart -> provision ->
assign_ips. Every body is idempotent: names derive from job and node ids, and each looks for what
an earlier run already made. A body raises to fail (RETRYABLE errors are tried again); what it
returns is kept in the step's ``detail``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared import identity, locks
from shared.clone import faults, masking, neutralize, safety
from shared.clone.events import record_event
from shared.clone.gate import Ticket, job_node
from shared.clone.sources import restart_source
from shared.config import get_settings
from shared.db import session_scope
from shared.drivers import PermanentDriverError, get_driver
from shared.environments import fence_environment, template_lookup
from shared.models import CloneJob, Environment, Host, JobNode, Node, Snapshot, utcnow
from shared.stacks import CATALOG
from shared.stacks.base import Stack
from shared.states import Consistency, FaultPoint, NodeState, SnapshotState, Step
from shared.transfer_service import fetch_snapshot

Notify = Callable[..., None]  # best-effort progress to watchers outside the database (Flower)
PROGRESS_EVERY_S = 0.5
REDACTED = "[redacted]"
log = logging.getLogger("envclone.steps")


def _job_node(ticket: Ticket) -> JobNode:
    with session_scope() as session:
        jn = job_node(session, ticket.job_id, ticket.source_node_id)
        session.expunge(jn)
    return jn


def _lock_ttl() -> float:
    s = get_settings()
    return s.task_time_limit_s + 2 * s.max_downtime_s


def _take(ticket: Ticket) -> None:
    """Take the source node, or raise NodeBusy once the claim that keeps this job's place is saved."""
    with session_scope() as session:
        busy = locks.take(session, ticket.source_node_id, ticket.job_id, _lock_ttl())
    if busy is not None:
        raise busy


def online_stack(ticket: Ticket) -> Stack | None:
    """The node's stack if the node is copied while it serves (``consistency: online`` and a stack
    that can): then it is not quiesced."""
    if ticket.options.get("consistency", Consistency.ONLINE) != Consistency.ONLINE:
        return None
    with session_scope() as session:
        stack = CATALOG[session.get(Node, ticket.source_node_id).stack]
    return stack if stack.online_copy_supported else None


def quiesce(ticket: Ticket, _notify: Notify) -> dict[str, Any]:
    # NodeBusy: wait our turn. A held window takes the node until its restart step; so does an
    # online copy that must run alone (Stack.online_copy_exclusive). Any other online copy shares
    # the node in its snapshot step, for as long as it copies.
    online = online_stack(ticket)
    if online is None or online.online_copy_exclusive:
        _take(ticket)
    if online is not None:
        return {"consistency": Consistency.ONLINE, "held": False}
    jn = _job_node(ticket)
    driver = get_driver()
    precopied = 0
    if jn.quiesced_at is None:
        precopied = driver.prepare_snapshot(ticket.source_node_id, jn.snapshot_id)  # slow work, still serving
        with session_scope() as session:
            # Durable before the stop: from here on the source must be restarted, whatever happens.
            job_node(session, ticket.job_id, ticket.source_node_id).quiesced_at = utcnow()
    driver.quiesce(ticket.source_node_id)
    return {"precopied_bytes": precopied}


def snapshot(ticket: Ticket, _notify: Notify) -> dict[str, Any]:
    jn = _job_node(ticket)
    online = online_stack(ticket)
    if online is not None:
        token = None
        if online.online_copy_exclusive:
            # Taken again (this job's own lock: its time starts over): nothing caps how long an
            # online snapshot waits in a queue or retries, as the watchdog caps a held window.
            _take(ticket)
        else:
            # Shared while it copies: a copy never starts inside another job's held window (a
            # stopped server cannot be copied), nor while a window waits for the node; and no
            # window opens during it.
            with session_scope() as session:
                token = locks.share(session, ticket.source_node_id, ticket.job_id, _lock_ttl())
        try:
            faults.fail_before(FaultPoint.ONLINE_COPY, ticket.node_name, ticket.attempt, ticket.options)
            faults.hang_after(FaultPoint.ONLINE_COPY, ticket.node_name, ticket.attempt, ticket.options)
            info = get_driver().snapshot_online(ticket.source_node_id, jn.snapshot_id)
        finally:
            if token is not None:
                _unshare(ticket, token)
    else:
        info = get_driver().snapshot(ticket.source_node_id, jn.snapshot_id)
    if _job_node(ticket).restarted_at is not None:
        # The watchdog restarted the source while we copied: the snapshot may be torn.
        get_driver().delete_snapshot(jn.snapshot_id)
        raise PermanentDriverError("the source was restarted during the snapshot (downtime limit)")
    with session_scope() as session:
        if session.get(CloneJob, ticket.job_id).state.done:
            # The job ended while we copied (a host went down): nothing will use this snapshot.
            get_driver().delete_snapshot(jn.snapshot_id)
            raise PermanentDriverError("the job ended during the snapshot")
    with session_scope() as session:
        row = session.get(Snapshot, jn.snapshot_id) or Snapshot(id=jn.snapshot_id, job_id=ticket.job_id,
                                                                source_node_id=ticket.source_node_id)
        row.state, row.method = SnapshotState.READY, info.method
        row.size_bytes, row.window_ms, row.host = info.size_bytes, info.window_ms, get_settings().host_name
        session.add(row)
        # The freshest size of the source, for the next plan of a clone of it.
        session.get(Node, ticket.source_node_id).size_bytes = info.size_bytes
    return {"method": info.method, "size_bytes": info.size_bytes, "window_ms": info.window_ms}


def _unshare(ticket: Ticket, token: str) -> None:
    try:
        with session_scope() as session:
            locks.unshare(session, ticket.source_node_id, ticket.job_id, token)
    except Exception as exc:  # never in place of the copy's own outcome: the restart step or the TTL ends it
        log.warning("job=%s node=%s the share of the source outlives its copy: %s", ticket.job_id,
                    ticket.node_name, exc)


def restart(ticket: Ticket, _notify: Notify) -> dict[str, Any]:
    with session_scope() as session:
        jn = job_node(session, ticket.job_id, ticket.source_node_id)
        restart_source(session, jn)
        if jn.quiesced_at is None:
            return {"source": "was not stopped by this job"}
        return {"downtime_ms": jn.downtime_ms}


def bring_back_source(ticket: Ticket, _exc: BaseException) -> None:
    """A step inside the window failed for good: the source comes back before the step is closed."""
    restart(ticket, lambda **_: None)


def provision(ticket: Ticket, notify: Notify) -> dict[str, Any]:
    jn = _job_node(ticket)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S and done < total:
            return
        last[0] = now
        with session_scope() as session:
            row = job_node(session, ticket.job_id, ticket.source_node_id)
            row.bytes_copied, row.bytes_total = done, total
            record_event(session, session.get(CloneJob, ticket.job_id), "progress", node=ticket.node_name,
                         bytes_copied=done, bytes_total=total)
        notify(current=done, total=total, node=ticket.node_name)

    with session_scope() as session:
        job = session.get(CloneJob, ticket.job_id)
        target = job.target_environment_id
        retained = bool(job.options.get("retain_snapshots") or job.options.get("keep_on_failure"))
        snap = session.get(Snapshot, jn.snapshot_id)
        kept_on = (snap.host if snap is not None else None) or session.get(Node, ticket.source_node_id).host
        stale = session.get(Node, jn.clone_node_id).state == NodeState.PENDING
        source_url = None
        if kept_on != get_settings().host_name:
            row = session.get(Host, kept_on)
            source_url = row.transfer_url if row is not None else None
            if not source_url:
                raise PermanentDriverError(f"host {kept_on} serves no snapshots (its agent has no "
                                           "ENVCLONE_TRANSFER_BIND)")
    driver = get_driver()
    # A snapshot of this host that the job does not keep becomes the volume by a rename: its bytes
    # are not written a second time on the disk the source serves from (ENVCLONE_PROVISION_MOVE).
    move = source_url is None and not retained and get_settings().provision_move
    if stale and not move:
        driver.destroy_node(jn.clone_node_id)  # what an older run left: made again from this snapshot
    # (Moved: what an older run left is the snapshot itself, half or wholly moved; the driver takes
    # it up where it is.)
    detail: dict[str, Any] = {"host": get_settings().host_name}
    if source_url is not None:
        # Straight from the source host's agent; resumable, verified file by file on arrival.
        got = fetch_snapshot(jn.snapshot_id, source_url, progress)
        detail["transfer"] = {"from": kept_on, "bytes_received": got.bytes_received, "bytes_total": got.bytes_total,
                              "files_skipped": got.files_skipped}
    # A received copy is this host's alone: it becomes the volume (the source host's goes when the job ends).
    copied = driver.provision(jn.snapshot_id, jn.clone_node_id, progress, owner=identity.ensure_account(target),
                              consume=source_url is not None or move)
    with session_scope() as session:
        # Not over a teardown: a job ended meanwhile (a host went down) has destroyed this node.
        session.execute(update(Node).where(Node.id == jn.clone_node_id, Node.state != NodeState.DESTROYED)
                        .values(state=NodeState.PROVISIONED, size_bytes=copied))
    return {"bytes": copied, "moved": source_url is None and move, **detail}


def _maps(session: Session, job_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """(address map, secret map) from every source node of the job to its clone: the clone's
    configs must name the clone's nodes, with the clone's credentials."""
    addresses: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for src, clone in session.execute(
            select(Node, JobNode.clone_node_id).join(JobNode, JobNode.source_node_id == Node.id)
            .where(JobNode.job_id == job_id)).all():
        copy = session.get(Node, clone)
        addresses[src.address] = copy.address
        old, new = src.credentials, copy.credentials
        for key, value in old.items():
            if key.endswith("password") and value != new.get(key):
                secrets[value] = new[key]
        if old.get("username") != new.get("username") and old.get("password"):
            # A renamed user, where URLs name it: user:password@ moves as one.
            secrets[f"{old['username']}:{old['password']}@"] = f"{new['username']}:{new['password']}@"
    return addresses, secrets


def assign_ips(ticket: Ticket, _notify: Notify) -> dict[str, Any]:
    """Rewire the stopped clone node, make it safe (``shared.clone.safety``), then start it: the
    first time it listens on an address it has its own address, credentials and configs, its
    on_clone actions have run and no trace of its source was found in its files."""
    jn = _job_node(ticket)
    driver = get_driver()
    with session_scope() as session:
        clone = session.get(Node, jn.clone_node_id)
        address_map, secret_map = _maps(session, ticket.job_id)
        address, port, credentials = clone.address, clone.port, dict(clone.credentials)
        target = session.get(Environment, clone.environment_id)
        lookup = template_lookup(target)
        actions = [a.resolved(lookup) for a in neutralize.for_node(ticket.options.get("on_clone", []),
                                                                   ticket.node_name)]
        needles = safety.source_needles(session, ticket.job_id)
        target_id = target.id
    fence_environment(target_id)  # fenced from its source before its first process starts
    driver.assign_address(jn.clone_node_id, address, port)
    driver.set_credentials(jn.clone_node_id, credentials)  # stopped: no client can use the old ones
    rewrites = driver.rewrite_config(jn.clone_node_id, address_map, secret_map)
    detail: dict[str, Any] = {"address": address, "credentials_rotated": bool(credentials), "rewrites": [
        {"node": ticket.node_name, "file": r.file, "kind": "credential" if r.secret else "address",
         "old": REDACTED if r.secret else r.old, "new": REDACTED if r.secret else r.new, "count": r.count}
        for r in rewrites]}
    rules = masking.for_node(ticket.options.get("mask", []), ticket.node_name)
    mask = (rules, str(ticket.options.get("mask_seed", ""))) if rules else None
    safety.make_safe(driver, ticket, jn.clone_node_id, actions, needles, detail, mask)  # UnsafeClone: never starts
    driver.restart(jn.clone_node_id, get_settings().health_timeout_s)
    with session_scope() as session:
        session.execute(update(Node).where(Node.id == jn.clone_node_id, Node.state != NodeState.DESTROYED)
                        .values(state=NodeState.RUNNING))
    return detail


Body = Callable[[Ticket, Notify], dict[str, Any] | None]
FailureHook = Callable[[Ticket, BaseException], None]


@dataclass(frozen=True)
class StepSpec:
    body: Body
    # Runs when the step fails for good, before the failure is recorded.
    on_failure: FailureHook | None = None
    # Runs even after an earlier step failed or the job was cancelled: what keeps sources up.
    always_run: bool = False


STEPS: dict[Step, StepSpec] = {
    Step.QUIESCE: StepSpec(quiesce, on_failure=bring_back_source),
    Step.SNAPSHOT: StepSpec(snapshot, on_failure=bring_back_source),
    Step.RESTART: StepSpec(restart, always_run=True),
    Step.PROVISION: StepSpec(provision),
    Step.ASSIGN_IPS: StepSpec(assign_ips),
}
