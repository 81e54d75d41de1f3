"""Request and response schemas: one set of pydantic models validates requests and generates
/openapi.json."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from shared.stacks import CATALOG
from shared.states import EnvState, FaultKind, FaultPoint, JobState, NodeState, Step, StepState

DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
# Config keys are environment-variable names; values must not carry line breaks or other control
# characters, which would let one value inject lines into the node's config file: no C0 or C1
# control (\n \r \x0b \x0c \x1c-\x1e, U+0085 among them) and no Unicode line or paragraph separator
# (U+2028, U+2029) -- everything str.splitlines() breaks a line on.
ConfigKey = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")]
ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"
_LINE_BREAKING = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(value: str) -> str:
    if found := _LINE_BREAKING.search(value):
        raise ValueError(f"must be one line without control characters; U+{ord(found.group()):04X} "
                         f"({unicodedata.name(found.group(), 'a control character')}) is not allowed")
    return value


ConfigValue = Annotated[str, Field(max_length=2048, json_schema_extra={"pattern": ONE_LINE}),
                        AfterValidator(_one_line)]

StackName = Enum("StackName", {name: name for name in sorted(CATALOG)}, type=str)  # type: ignore[misc]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeIn(Strict):
    name: DnsLabel
    stack: StackName  # type: ignore[valid-type]
    config: dict[ConfigKey, ConfigValue] = Field(default_factory=dict, max_length=64)


class EnvironmentIn(Strict):
    name: DnsLabel
    nodes: list[NodeIn] = Field(min_length=1, max_length=1024)


class FaultIn(Strict):
    step: FaultPoint
    node: str = Field(default="*", max_length=63)
    times: int = Field(default=1, ge=1, le=100)
    kind: FaultKind = FaultKind.TRANSIENT
    seconds: float = Field(default=0.0, ge=0, le=600, description="How long a `hang` fault stalls.")


class CloneIn(Strict):
    name: DnsLabel
    keep_on_failure: bool = False
    retain_snapshots: bool = False
    dry_run: bool = False
    faults: list[FaultIn] = Field(default_factory=list, max_length=20,
                                  description="Fault injection (only when the server enables it).")


class EnvPath(Strict):
    name: DnsLabel


class JobPath(Strict):
    job_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


# An event id: ASCII digits only (str.isdigit() would take "²" or "١", which int() refuses). Empty
# means "from the start", as an EventSource that has seen no id yet may send.
EventId = Annotated[str, StringConstraints(pattern=r"^[0-9]{0,18}$")]


class EventsQuery(Strict):
    last_event_id: EventId | None = Field(default=None, description="Resume after this event id.")


class EventsHeader(BaseModel):
    last_event_id: EventId | None = Field(default=None, alias="Last-Event-ID",
                                          description="Resume after this event id (wins over the query).")
    model_config = ConfigDict(populate_by_name=True)


class JobQuery(Strict):
    state: JobState | None = None
    environment: DnsLabel | None = None
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000)


class ListQuery(Strict):
    limit: int = Field(default=100, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000)


class IdempotencyHeader(BaseModel):
    idempotency_key: Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")] | None = Field(
        default=None, alias="Idempotency-Key")
    model_config = ConfigDict(populate_by_name=True)


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


class NodeOut(BaseModel):
    name: str
    stack: str
    address: str
    port: int
    state: NodeState
    url: str | None


class EnvironmentOut(BaseModel):
    name: str
    state: EnvState
    source: str | None
    error: str | None
    created_at: datetime
    nodes: list[NodeOut]


class EnvironmentList(BaseModel):
    items: list[EnvironmentOut]
    total: int


class StepOut(BaseModel):
    step: Step
    state: StepState
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


class JobNodeOut(BaseModel):
    name: str
    steps: list[StepOut]
    downtime_ms: int | None
    bytes_copied: int
    bytes_total: int


class JobOut(BaseModel):
    id: str
    state: JobState
    source: str
    target: str
    percent: int
    run: int
    error: str | None
    options: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rewrites: list[dict[str, Any]]
    nodes: list[JobNodeOut]


class JobList(BaseModel):
    items: list[JobOut]
    total: int


class PlanNode(BaseModel):
    name: str
    stack: str
    source_address: str
    address: str | None
    steps: list[Step]
    bytes: int
    estimated_downtime_ms: int


class PlanOut(BaseModel):
    dry_run: Literal[True] = True
    source: str
    target: str
    ok: bool
    nodes: list[PlanNode]
    addresses: list[str]
    disk_bytes_needed: int
    disk_bytes_free: int
    snapshot_method: str
    estimated_duration_ms: int
    conflicts: list[ErrorBody]
