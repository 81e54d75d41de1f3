"""Tasks only a host's own agent runs (they arrive on its queue): its sweep, and its round of the
watchdog rules that act on nodes -- bringing back overdue sources and dead nodes, rebuilding a
flushed fence, reporting its disk."""

from __future__ import annotations

from celery import Task, shared_task

from shared import fence, sweep
from shared.clone import supervision
from shared.environments import rebuild_fences, reconcile_nodes
from shared.hosts import report_local_host


@shared_task(name="envclone.sweep", bind=True, acks_late=True, ignore_result=True)
def sweep_task(self: Task) -> dict[str, int]:
    return sweep.sweep_host()


@shared_task(name="envclone.host_round", bind=True, ignore_result=True)
def host_round(self: Task) -> dict[str, int]:
    sources = nodes = 0
    swept: dict[str, int] = {}
    with supervision.rounds():
        with supervision.next_round_if_locked("restarting overdue sources"):
            sources = supervision.restart_overdue_sources()
        with supervision.next_round_if_locked("reconciling nodes"):
            nodes = reconcile_nodes()
        with supervision.next_round_if_locked("the sweep"):
            swept = sweep.sweep_host()
        with supervision.next_round_if_locked("the host's report"):
            report_local_host()
    if not fence.unavailable_reason() and not fence.present():
        rebuild_fences()  # the ruleset was flushed (or the machine restarted) under us
    return {"sources_restarted": sources, "nodes_restarted": nodes, **swept}
