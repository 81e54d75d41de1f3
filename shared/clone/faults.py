"""Fault injection for tests and staging: make a step fail, or hang after its work and before it
is recorded (the worst moment to lose a worker). Off unless the server enables it."""

from __future__ import annotations

import time
from typing import Any

from shared.config import FaultSpec, get_settings
from shared.drivers import PermanentDriverError, TransientDriverError
from shared.states import FaultKind


def faults_for(point: str, node: str, options: dict[str, Any]) -> list[FaultSpec]:
    settings = get_settings()
    specs = list(settings.faults)
    if settings.fault_injection:
        specs += [FaultSpec.model_validate(f) for f in options.get("faults", [])]
    return [f for f in specs if f.step == point and f.node in ("*", node)]


def fail_before(point: str, node: str, attempt: int, options: dict[str, Any]) -> None:
    for spec in faults_for(point, node, options):
        if spec.kind != FaultKind.HANG and attempt <= spec.times:
            msg = f"injected {spec.kind} fault in {point} (attempt {attempt} of {spec.times})"
            raise (TransientDriverError if spec.kind == FaultKind.TRANSIENT else PermanentDriverError)(msg)


def hang_after(point: str, node: str, attempt: int, options: dict[str, Any]) -> None:
    for spec in faults_for(point, node, options):
        if spec.kind == FaultKind.HANG and attempt <= spec.times:
            time.sleep(spec.seconds)  # the fault itself: a step that stalls
