"""Every state and step name, defined once. Models store them, the API's schemas and the CLI list
them, and the migrations' CHECK constraints are built from them."""

from __future__ import annotations

from enum import StrEnum


class EnvState(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    FAILED = "failed"
    DELETING = "deleting"


class NodeState(StrEnum):
    PENDING = "pending"
    PROVISIONED = "provisioned"
    RUNNING = "running"
    STOPPED = "stopped"
    FAILED = "failed"
    DESTROYED = "destroyed"

    @property
    def has_process(self) -> bool:
        """A node in this state has a volume and may have a process (so a URL means something)."""
        return self in (NodeState.PROVISIONED, NodeState.RUNNING, NodeState.STOPPED)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in JOB_DONE


class StepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in STEP_DONE


class Step(StrEnum):
    """The clone steps of one source node, in the order they run."""

    QUIESCE = "quiesce"
    SNAPSHOT = "snapshot"
    RESTART = "restart"
    PROVISION = "provision"
    ASSIGN_IPS = "assign_ips"

    @property
    def seq(self) -> int:
        return CLONE_STEPS.index(self)


# Where a fault can be injected: any step, the report, or an online copy as it starts, the node
# shared (a hang there is a copy that takes its time).
FaultPoint = StrEnum("FaultPoint", {**{s.name: s.value for s in Step}, "REPORT": "report",
                                    "ONLINE_COPY": "online_copy"})


class FaultKind(StrEnum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    HANG = "hang"  # the step does its work, then stalls before recording it (to kill it there)


class Consistency(StrEnum):
    """How a clone's copy of a node is made consistent."""

    ONLINE = "online"  # copied while it serves, refusing nothing (a backup API); stacks that cannot: STOP
    STOP = "stop"  # held still (stopped, or writes paused) for the copy, then restarted


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"


class SnapshotState(StrEnum):
    CREATING = "creating"
    READY = "ready"
    DELETED = "deleted"


JOB_DONE = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
STEP_DONE = frozenset({StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED, StepState.CANCELLED})
CLONE_STEPS: tuple[Step, ...] = tuple(Step)
