"""Request and response schemas: one set of pydantic models validates requests and generates
/openapi.json."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from enum import Enum
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, IPvAnyNetwork, StringConstraints, model_validator

from shared.stacks import CATALOG
from shared.states import Consistency, EnvState, FaultKind, FaultPoint, HostState, JobState, NodeState, Step, StepState

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


HostName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{0,62}$")]


class NodeIn(Strict):
    name: DnsLabel
    stack: StackName  # type: ignore[valid-type]
    config: dict[ConfigKey, ConfigValue] = Field(default_factory=dict, max_length=64)
    host: HostName | None = Field(default=None, description=(
        "Pin the node to this host; default: the up host with the most free disk (nodes spread)."))


class EgressIn(Strict):
    cidr: IPvAnyNetwork
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=32)


SqlStatement = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$", min_length=1, max_length=10_000)]
KeyPattern = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]*$", min_length=1, max_length=512)]


class OnCloneIn(Strict):
    """One action run on every clone before it is reachable; exactly one of sql, delete_keys, config."""

    node: DnsLabel
    sql: list[SqlStatement] | None = Field(default=None, min_length=1, max_length=50, description=(
        "postgres: statements run in one transaction, as the superuser, in the application database."))
    delete_keys: list[KeyPattern] | None = Field(default=None, min_length=1, max_length=50, description=(
        "valkey: glob patterns; every matching key is deleted (SCAN + DEL)."))
    config: dict[ConfigKey, ConfigValue] | None = Field(default=None, min_length=1, max_length=64, description=(
        "webapp: keys set or overridden in its .env; values may name the clone's nodes ({{db.url}})."))

    @model_validator(mode="after")
    def _one_kind(self) -> OnCloneIn:
        if sum(v is not None for v in (self.sql, self.delete_keys, self.config)) != 1:
            raise ValueError("give exactly one of sql, delete_keys, config")
        return self

    def stored(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


ON_CLONE_DESCRIPTION = ("Actions run on the clone before anyone can reach it (before each node first listens); "
                        "any failure fails the job and the clone is torn down.")


class EnvironmentIn(Strict):
    name: DnsLabel
    nodes: list[NodeIn] = Field(min_length=1, max_length=1024)
    egress: list[EgressIn] = Field(default_factory=list, max_length=32, description=(
        "Where the nodes may connect besides each other (the kernel refuses everything else)."))
    on_clone: list[OnCloneIn] = Field(default_factory=list, max_length=64, description=(
        ON_CLONE_DESCRIPTION + " Run on every clone of this environment."))


MaskIdentifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")]
MaskTable = Annotated[str, StringConstraints(
    pattern=r"^[A-Za-z_][A-Za-z0-9_$]{0,62}(\.[A-Za-z_][A-Za-z0-9_$]{0,62})?$")]
MaskWith = Annotated[str, StringConstraints(
    pattern=r"^(email|name|phone|null|hash|redact|constant:[^\x00]{0,1024})$")]


class MaskIn(Strict):
    """One masking rule: the clone's ``table.column`` on a postgres or mariadb node gets fakes."""

    node: DnsLabel
    table: MaskTable = Field(description="a table (or schema.table) of the application database")
    column: MaskIdentifier
    with_: MaskWith = Field(alias="with", description=(
        "email, name, phone, hash: a fake derived from the value (the same value, the same fake within one "
        "clone); redact: a fixed mask; null; constant:<value>."))
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def stored(self) -> dict[str, str]:
        return {"node": self.node, "table": self.table, "column": self.column, "with": self.with_}


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
    on_clone: list[OnCloneIn] = Field(default_factory=list, max_length=64, description=(
        ON_CLONE_DESCRIPTION + " Run after the source environment's own."))
    on_leak: Literal["fail", "warn"] = Field(default="fail", description=(
        "A trace of the source (address, host:port, password) found in the clone's files before its first "
        "start: `fail` fails the job and tears the clone down; `warn` lists it and goes on."))
    mask: list[MaskIn] = Field(default_factory=list, max_length=200, description=(
        "Personal data replaced by fakes on the clone before anyone can reach it (one transaction per node); "
        "any failure (an unknown table or column) fails the job and the clone is torn down."))
    mask_seed: Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")] | None = Field(
        default=None, description="Fakes derive from it: the same seed, the same fakes. Default: random per "
        "job (never shown).")
    faults: list[FaultIn] = Field(default_factory=list, max_length=20,
                                  description="Fault injection (only when the server enables it).")
    target_host: HostName | None = Field(default=None, description=(
        "Put every clone node on this host. Default: each on its source's host when it has room (a local "
        "copy), else the up host with the most free disk; a snapshot crosses hosts agent to agent."))
    placement: dict[DnsLabel, HostName] = Field(default_factory=dict, max_length=1024, description=(
        "Pin single clone nodes to hosts: {\"db\": \"host-2\"} (wins over target_host)."))


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

    @classmethod
    @cache
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # flask-openapi3 asks for it on every request (to read each field's type); it never changes.
        return super().model_json_schema(*args, **kwargs)


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorOut(BaseModel):
    error: ErrorBody


class NodeOut(BaseModel):
    name: str
    stack: str
    host: str
    address: str
    port: int
    state: NodeState
    url: str | None


class EnvironmentOut(BaseModel):
    name: str
    state: EnvState
    fence: str | None
    egress: list[dict[str, Any]]
    on_clone: list[dict[str, Any]]
    source: str | None
    error: str | None
    created_at: datetime
    nodes: list[NodeOut]


class EnvironmentList(BaseModel):
    items: list[EnvironmentOut]
    total: int


class StepOut(BaseModel):
    step: Step
    host: str | None = Field(description="the host whose agent ran it")
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


class SafetyOut(BaseModel):
    fence: str | None = Field(description="the clone's kernel fence: `enforced` or `unavailable: <why>`")
    credentials_rotated: int = Field(description="nodes whose credentials are new")
    rewrites: int = Field(description="config rewrites (addresses and credentials)")
    leaks: int = Field(description="traces of the source found in the clone's files before its first start")
    on_leak: str
    actions: int = Field(description="on_clone actions run")
    actions_failed: int
    masked_rules: int = Field(default=0, description="masking rules run")
    masked_failed: int = 0
    masked_rows: int = Field(default=0, description="rows masked, over every rule")
    scanned_nodes: int
    scanned_files: int
    scan_complete: bool = Field(description="false: a node had more files than the scan reads")


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
    leaks: list[dict[str, Any]] = Field(description="{node, file, line, kind}: never the value")
    actions: list[dict[str, Any]] = Field(description="{node, kind, state, ...counts}: on_clone actions run")
    masked: list[dict[str, Any]] = Field(default_factory=list, description=(
        "{node, table, column, with, rows, state}: masking rules run (a constant's value is not shown)"))
    safety: SafetyOut
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
    source_host: str
    host: str = Field(description="where the clone node goes")
    bytes_across_hosts: int = Field(description="bytes the snapshot sends from the source's host to this one")
    estimated_ms: int = Field(description="this node's clone, snapshot to start, transfer included")


class HostOut(BaseModel):
    name: str
    state: HostState
    nodes: int
    free_bytes: int
    reflink: bool
    heartbeat_at: datetime


class HostList(BaseModel):
    items: list[HostOut]


class HostPath(Strict):
    name: HostName


class PredictedLeak(BaseModel):
    node: str
    key: str
    kind: str
    origin: Literal["config", "on_clone"]
    outcome: Literal["rewritten", "fail", "warn"]


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
    predicted_leaks: list[PredictedLeak] = Field(description=(
        "Config values that name a source address, host:port or password literally instead of through a "
        "template. In a node's config the rewrite replaces them (`rewritten`); in an on_clone config they are "
        "written after the rewrite, so the scan will find them (`fail` or `warn`, as on_leak says)."))
    conflicts: list[ErrorBody]
