"""SQLAlchemy 2.x models: the single source of truth the API, CLI, Flower-watchers and workers read."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
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
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


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


# Environment states
ENV_CREATING, ENV_RUNNING, ENV_FAILED, ENV_DELETING = "creating", "running", "failed", "deleting"
# Job states
JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED = "queued", "running", "succeeded", "failed"
JOB_CANCELLING, JOB_CANCELLED = "cancelling", "cancelled"
JOB_DONE_STATES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)
# Step states
STEP_PENDING, STEP_RUNNING, STEP_RETRYING = "pending", "running", "retrying"
STEP_SUCCEEDED, STEP_FAILED, STEP_SKIPPED, STEP_CANCELLED = "succeeded", "failed", "skipped", "cancelled"
STEP_DONE_STATES = (STEP_SUCCEEDED, STEP_FAILED, STEP_SKIPPED, STEP_CANCELLED)
# Clone steps, in order, per source node.
CLONE_STEPS = ("quiesce", "snapshot", "restart", "provision", "assign_ips")


class ApiToken(Base):
    """An API token of a tenant; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Environment(Base):
    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_environment_tenant_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(63), index=True)
    name: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16), default=ENV_CREATING)
    source_environment_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Outbox for create/delete: set once the task reached the broker; the dispatcher sends the rest.
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)

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
    state: Mapped[str] = mapped_column(String(16), default="pending")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source_node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

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
    state: Mapped[str] = mapped_column(String(16), default=JOB_QUEUED, index=True)
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    rewrites: Mapped[list[Any]] = mapped_column(default=list)
    percent: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Which run of the job this is: a retry starts run 2 (percent is monotonic within a run).
    run: Mapped[int] = mapped_column(Integer, default=1)
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
    step: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=STEP_PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Snapshot(Base):
    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    source_node_id: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="creating")
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    window_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeLock(Base):
    """One job at a time may hold a source node between quiesce and restart (expires, so a lost
    holder cannot block the node forever; the watchdog restarts the node first)."""

    __tablename__ = "node_locks"

    node_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32))
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
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
