"""Why a request cannot be carried out, in the domain's words. The API maps a Problem to an HTTP
status; the CLI and tests read the same Conflict."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Problem(StrEnum):
    NOT_FOUND = "not_found"
    INVALID = "invalid"  # the request itself is wrong, whatever the state
    CONFLICT = "conflict"  # the request is fine, the current state does not allow it


@dataclass(frozen=True)
class Conflict:
    code: str
    message: str
    field: str | None = None


class PlanError(Exception):
    def __init__(self, conflict: Conflict, problem: Problem = Problem.CONFLICT) -> None:
        super().__init__(conflict.message)
        self.conflict, self.problem = conflict, problem
