"""SQLAlchemy 2.x models: the single source of truth the API, CLI, Flower-watchers and workers read."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship

from shared.states import EnvState, HostState, JobState, NodeState, SnapshotState, Step, StepState


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (SQLite has no time zones), always hands back aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


def row_values(model: type[Base], **values: Any) -> dict[str, Any]:
    """``values`` with every other column's Python-side default filled in: a row for a Core insert
    that a transient ``model(**row)`` describes exactly (an ORM object gets its defaults at flush)."""
    out = dict(values)
    for column in model.__table__.columns:
        default = column.default
        if column.key in out or default is None:
            continue
        out[column.key] = default.arg(None) if default.is_callable else default.arg
    return out


def enum_column(enum: type[StrEnum], name: str, **kw: Any) -> MappedColumn[Any]:
    """A state column: stored as its string value, with a CHECK constraint listing the enum's values
    (``name`` names the constraint; migrations build the same one from the same enum)."""
    return mapped_column(SAEnum(enum, native_enum=False, length=16, create_constraint=True, name=name,
                                values_callable=lambda e: [m.value for m in e], validate_strings=True), **kw)


class ApiToken(Base):
    """An API token of a tenant; only its SHA-256 is stored. A token past ``expires_at`` or with
    ``revoked_at`` set authenticates nobody; rows are kept so `envclone token list` can show them."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Written at most once a minute per token (api.auth), so it costs no write per request.
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Environment(Base):
    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_environment_tenant_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str] = mapped_column(String(63))
    state: Mapped[EnvState] = enum_column(EnvState, "ck_environment_state", default=EnvState.CREATING)
    source_environment_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Outbox for create/delete: set once the task reached the broker; the dispatcher sends the rest.
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Where its nodes may connect besides each other: [{"cidr": ..., "ports": [...]}].
    egress: Mapped[list[Any]] = mapped_column(default=list)
    # "enforced", or "unavailable: <why>" (no nftables, not root), as the worker last set it up.
    fence: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # What runs on every clone of it before the clone is reachable (shared/clone/neutralize.py):
    # [{"node": "db", "sql": [...]}, {"node": "cache", "delete_keys": [...]}, {"node": "web", "config": {...}}].
    on_clone: Mapped[list[Any]] = mapped_column(default=list)

    nodes: Mapped[list[Node]] = relationship(
        back_populates="environment", order_by="Node.name", cascade="all, delete-orphan"
    )


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("environment_id", "name", name="uq_node_environment_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    stack: Mapped[str] = mapped_column(String(32))
    address: Mapped[str] = mapped_column(String(45))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[NodeState] = enum_column(NodeState, "ck_node_state", default=NodeState.PENDING)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source_node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Written by the worker that made or moved the node, so a response never asks a driver.
    url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    # The node's own credentials (stack-defined keys: username, password, ...). Only the credentials
    # call of the API hands them out; responses carry ``url`` without them.
    credentials: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Bytes a snapshot of the node holds, as last measured by a worker (plans read it).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # The host whose agent alone acts on it (shared.placement chose it).
    host: Mapped[str] = mapped_column(String(63), default="local", index=True)

    environment: Mapped[Environment] = relationship(back_populates="nodes")


class AddressLease(Base):
    """One row per leased address; the primary key is what makes two leases of one address impossible."""

    __tablename__ = "address_leases"

    address: Mapped[str] = mapped_column(String(45), primary_key=True)
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    leased_at: Mapped[datetime] = mapped_column(default=utcnow)


class CloneJob(Base):
    __tablename__ = "clone_jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_job_idempotency"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    source_environment_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    target_environment_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    source_name: Mapped[str] = mapped_column(String(63))
    target_name: Mapped[str] = mapped_column(String(63))
    state: Mapped[JobState] = enum_column(JobState, "ck_job_state", default=JobState.QUEUED, index=True)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    rewrites: Mapped[list[Any]] = mapped_column(default=list)
    # What the clone's safety pass found and did, per node (written when the job ends, whatever
    # its outcome): leaks [{node, file, line, kind}] (never a value), on_clone actions run.
    leaks: Mapped[list[Any]] = mapped_column(default=list)
    actions: Mapped[list[Any]] = mapped_column(default=list)
    # Masking rules run: [{node, table, column, with, rows, state}] (a constant's value is not shown).
    masked: Mapped[list[Any]] = mapped_column(default=list)
    percent: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Which run of the job this is: a retry starts run 2 (percent is monotonic within a run).
    run: Mapped[int] = mapped_column(Integer, default=1)
    # The run whose per-node canvas a worker has published (at most one canvas per run).
    canvas_run: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Transactional outbox: set once the workflow reached the broker; a dispatcher sends the rest.
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)

    nodes: Mapped[list[JobNode]] = relationship(order_by="JobNode.name", cascade="all, delete-orphan")
    steps: Mapped[list[StepRun]] = relationship(
        order_by="(StepRun.node_name, StepRun.seq)", cascade="all, delete-orphan"
    )


class JobNode(Base):
    """What one source node of a job maps to: its clone, its snapshot, its measured downtime."""

    __tablename__ = "job_nodes"
    __table_args__ = (UniqueConstraint("job_id", "source_node_id", name="uq_job_node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("clone_jobs.id", ondelete="CASCADE"))
    source_node_id: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(63))
    clone_node_id: Mapped[str] = mapped_column(String(32))
    snapshot_id: Mapped[str] = mapped_column(String(32))
    quiesced_at: Mapped[datetime | None] = mapped_column(nullable=True)
    restarted_at: Mapped[datetime | None] = mapped_column(nullable=True)
    downtime_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bytes_copied: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)


class StepRun(Base):
    __tablename__ = "step_runs"
    __table_args__ = (UniqueConstraint("job_id", "source_node_id", "step", name="uq_step_run"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("clone_jobs.id", ondelete="CASCADE"), index=True)
    source_node_id: Mapped[str] = mapped_column(String(32))
    node_name: Mapped[str] = mapped_column(String(63))
    step: Mapped[Step] = enum_column(Step, "ck_step_run_step")
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[StepState] = enum_column(StepState, "ck_step_run_state", default=StepState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    host: Mapped[str | None] = mapped_column(String(63), nullable=True)  # the host whose agent ran it


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    source_node_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[SnapshotState] = enum_column(SnapshotState, "ck_snapshot_state", default=SnapshotState.CREATING)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    window_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    host: Mapped[str | None] = mapped_column(String(63), nullable=True)  # where it is kept (the source's host)


class NodeLock(Base):
    """One job at a time may hold a source node between quiesce and restart (expires, so a lost
    holder cannot block the node forever; the watchdog restarts the node first). While other jobs
    still share the node, the row is only a claim: its job waits for them, and keeps its place."""

    __tablename__ = "node_locks"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class NodeShare(Base):
    """A job copying a source node beside others while it serves (shared.locks.share): no job takes
    the node for a held window meanwhile. Expires as NodeLock does."""

    __tablename__ = "node_shares"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Whose share this is now: a newer run of the job that shared it again, or another delivery of
    # the step, is not unshared by the older one that ends after it.
    token: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime] = mapped_column()


class EnvironmentEvent(Base):
    """What happened to an environment outside a job: e.g. the reconciler restarted a dead node."""

    __tablename__ = "environment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    environment_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)


class JobEvent(Base):
    """Append-only log of step transitions and progress: what SSE streams and what 'percent' is made of."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Host(Base):
    """A machine that holds nodes, as its agent last reported it: what placement, plans and the API
    read instead of probing a filesystem themselves. ``heartbeat_at`` older than ENVCLONE_HOST_DOWN_S
    makes it ``down``; ``draining`` is an operator's word and outlives restarts."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    state: Mapped[HostState] = enum_column(HostState, "ck_host_state", default=HostState.UP)
    reflink: Mapped[bool] = mapped_column(Boolean, default=False)
    free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    address_pool: Mapped[str | None] = mapped_column(String(64), nullable=True)  # its nodes' addresses
    transfer_url: Mapped[str | None] = mapped_column(String(256), nullable=True)  # where its agent serves snapshots
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)  # its agent's start
