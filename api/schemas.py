"""Request and response schemas: one set of pydantic models validates requests and generates
/openapi.json."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, IPvAnyNetwork, StringConstraints

from shared.stacks import CATALOG
from shared.states import Consistency, EnvState, FaultKind, FaultPoint, JobState, NodeState, Step, StepState

DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
# Config keys are environment-variable names; values must not carry line breaks or other control
# characters, which would let one value inject lines into the node's config file.
ConfigKey = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]{0,63}$")]
ConfigValue = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=2048)]

StackName = Enum("StackName", {name: name for name in sorted(CATALOG)}, type=str)  # type: ignore[misc]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeIn(Strict):
    name: DnsLabel
    stack: StackName  # type: ignore[valid-type]
    config: dict[ConfigKey, ConfigValue] = Field(default_factory=dict, max_length=64)


class EgressIn(Strict):
    cidr: IPvAnyNetwork
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=32)


class EnvironmentIn(Strict):
    name: DnsLabel
    nodes: list[NodeIn] = Field(min_length=1, max_length=1024)
    egress: list[EgressIn] = Field(default_factory=list, max_length=32, description=(
        "Where the nodes may connect besides each other (the kernel refuses everything else)."))


class FaultIn(Strict):
    step: FaultPoint
    node: str = Field(default="*", max_length=63)
    times: int = Field(default=1, ge=1, le=100)
    kind: FaultKind = FaultKind.TRANSIENT
    seconds: float = Field(default=0.0, ge=0, le=600, description="How long a `hang` fault stalls.")


class CloneIn(Strict):
    name: DnsLabel
    consistency: Consistency = Field(default=Consistency.ONLINE, description=(
        "online: copied while the source serves, refusing nothing (PostgreSQL: base backup + WAL); "
        "stop: each source is held still briefly for the copy, then restarted."))
    rename_db_users: bool = Field(default=False, description="Give the clone's database application role a new "
                                  "name (its dependents' configs follow).")
    keep_on_failure: bool = False
    retain_snapshots: bool = False
    dry_run: bool = False
    faults: list[FaultIn] = Field(default_factory=list, max_length=20,
                                  description="Fault injection (only when the server enables it).")


class EnvPath(Strict):
    name: DnsLabel


class NodePath(Strict):
    name: DnsLabel
    node: DnsLabel


class CredentialsOut(BaseModel):
    username: str | None
    password: str
    url: str


class JobPath(Strict):
    job_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


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
    fence: str | None
    egress: list[dict[str, Any]]
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
    fence: str | None
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
    consistency: Consistency
    estimated_downtime_ms: int


class PlanOut(BaseModel):
    dry_run: Literal[True] = True
    source: str
    target: str
    ok: bool
    consistency: Consistency
    nodes: list[PlanNode]
    addresses: list[str]
    disk_bytes_needed: int
    disk_bytes_free: int
    snapshot_method: str
    estimated_duration_ms: int
    conflicts: list[ErrorBody]
