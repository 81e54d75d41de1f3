"""Clone safety: the pass that makes a clone node safe before it first serves, and the safety report
every job carries.

The pass runs inside assign_ips, on the stopped node, after its new address and credentials are set
and its configs rewritten (see ``shared.clone.neutralize`` for why in this order):

    config actions -> leak scan -> sql / delete_keys, then masking, on a private start -> (first start)

Fail closed: a failed action or masking rule (``shared.clone.masking``), or a leak under
``on_leak: "fail"`` (the default), fails the step, and a failed step makes the report tear the whole
clone down. Under ``"warn"`` the leaks are listed and the clone goes on. Findings name node, file,
line and kind, never a value."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.clone.gate import Ticket
from shared.clone.masking import Rule
from shared.clone.masking import payload as mask_payload
from shared.clone.neutralize import FILE_KINDS, Action
from shared.drivers import ActionFailed, Driver, PermanentDriverError
from shared.leaks import Needles
from shared.models import JobNode, Node, StepRun
from shared.states import Step

ON_LEAK_DEFAULT = "fail"


class UnsafeClone(PermanentDriverError):
    """The pass refused the node. ``detail`` is recorded on the failed step as a success's would be."""

    def __init__(self, message: str, detail: dict[str, Any]) -> None:
        super().__init__(message)
        self.detail = detail


def source_needles(session: Session, job_id: str) -> Needles:
    """Every source node's address, host:port and passwords, from the rows."""
    nodes = session.scalars(select(Node).join(JobNode, JobNode.source_node_id == Node.id)
                            .where(JobNode.job_id == job_id))
    return Needles.of((n.address, n.port, n.credentials) for n in nodes)


def _run(driver: Driver, node_id: str, actions: list[Action], detail: dict[str, Any],
         mask: tuple[list[Rule], str] | None = None) -> None:
    """Run ``actions`` (and then the masking rules, in the same private start) on the node."""
    calls = [(a.kind, a.payload) for a in actions]
    if mask is not None and mask[0]:
        calls.append(("mask", mask_payload(*mask)))
    if not calls:
        return
    try:
        results = driver.run_clone_actions(node_id, calls)
    except ActionFailed as exc:
        ran = len(exc.done)
        detail["actions"] += [a.record(r) for a, r in zip(actions, exc.done, strict=False)]
        if ran < len(actions):
            detail["actions"].append(actions[ran].record(error=str(exc)))
        else:  # the masking failed: one transaction, so no rule masked anything
            detail["masked"] = [rule.record(error=str(exc)) for rule in mask[0]]  # type: ignore[index]
        raise UnsafeClone(f"{exc}", detail) from exc
    detail["actions"] += [a.record(r) for a, r in zip(actions, results, strict=False)]
    if len(results) > len(actions):
        rows = results[len(actions)]["masked"]
        detail["masked"] = [rule.record(n) for rule, n in zip(mask[0], rows, strict=True)]  # type: ignore[index]


def make_safe(driver: Driver, ticket: Ticket, node_id: str, actions: list[Action], needles: Needles,
              detail: dict[str, Any], mask: tuple[list[Rule], str] | None = None) -> None:
    """Neutralize, scan and mask the stopped clone node; fills ``detail`` (actions, leaks, scan,
    masked). ``mask``: the node's rules and the clone's seed, run after its server actions in the
    same private start. UnsafeClone when the node must not start."""
    detail["actions"], detail["leaks"], detail["masked"] = [], [], []
    _run(driver, node_id, [a for a in actions if a.kind in FILE_KINDS], detail)
    scan = driver.scan_for_leaks(node_id, needles)
    detail["leaks"] = [{"node": ticket.node_name, **f} for f in scan.findings]
    detail["scan"] = scan.summary()
    on_leak = ticket.options.get("on_leak", ON_LEAK_DEFAULT)
    if detail["leaks"] and on_leak == "fail":
        where = ", ".join(f"{f['file']}:{f['line']} {f['kind']}" for f in scan.findings[:10])
        more = f" and {len(scan.findings) - 10} more" if len(scan.findings) > 10 else ""
        raise UnsafeClone(f"the clone holds {len(scan.findings)} trace(s) of its source (on_leak=fail): "
                          f"{where}{more}", detail)
    _run(driver, node_id, [a for a in actions if a.kind not in FILE_KINDS], detail, mask)


def collect(steps: Iterable[StepRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(leaks, actions) of every node, from the assign_ips steps' records."""
    leaks: list[dict[str, Any]] = []
    actions: list[dict[str, Any]] = []
    for step in sorted(steps, key=lambda s: s.node_name):
        if step.step == Step.ASSIGN_IPS:
            leaks += step.detail.get("leaks", [])
            actions += step.detail.get("actions", [])
    return leaks, actions


def report(steps: Iterable[StepRun], fence: str | None, on_leak: str | None, leaks: list[dict[str, Any]],
           actions: list[dict[str, Any]], masked: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The job's safety report, from rows: fence, credentials rotated (nodes), rewrites, leaks found
    (and what they do: ``on_leak``), actions run (and failed), masking rules run (and failed) and
    rows masked, how much the scan read."""
    masked = masked or []
    assign = [s for s in steps if s.step == Step.ASSIGN_IPS]
    scans = [s.detail["scan"] for s in assign if "scan" in s.detail]
    return {
        "fence": fence,
        "credentials_rotated": sum(1 for s in assign if s.detail.get("credentials_rotated")),
        "rewrites": sum(len(s.detail.get("rewrites", [])) for s in assign),
        "leaks": len(leaks),
        "on_leak": on_leak or ON_LEAK_DEFAULT,
        "actions": sum(1 for a in actions if a.get("state") == "succeeded"),
        "actions_failed": sum(1 for a in actions if a.get("state") == "failed"),
        "masked_rules": sum(1 for m in masked if m.get("state") == "succeeded"),
        "masked_failed": sum(1 for m in masked if m.get("state") == "failed"),
        "masked_rows": sum(int(m.get("rows", 0)) for m in masked),
        "scanned_nodes": len(scans),
        "scanned_files": sum(int(s.get("files", 0)) for s in scans),
        "scan_complete": all(s.get("complete", True) for s in scans),
    }
