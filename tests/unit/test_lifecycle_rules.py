"""The clone lifecycle's pure rules: where a retried node resumes, what a job's percent is, when a
job counts as succeeded, failed or cancelled, and how long a step waits before its next attempt."""

from __future__ import annotations

import pytest

from shared.clone.control import resume_index
from shared.clone.events import percent
from shared.clone.outcome import verdict
from shared.clone.retry import RetryPolicy
from shared.states import CLONE_STEPS, JobState, NodeState, Step, StepState

OK, FAIL, PEND = StepState.SUCCEEDED, StepState.FAILED, StepState.PENDING


@pytest.mark.parametrize("states, snapshot_ok, clone_ok, expected", [
    ([OK] * 5, True, True, 5),  # nothing to redo
    ([FAIL, PEND, OK, PEND, PEND], True, True, 0),  # quiesce failed: from the start
    ([OK, FAIL, OK, PEND, PEND], True, False, 0),  # a failed snapshot needs a fresh quiesce
    ([OK, OK, OK, FAIL, PEND], True, False, 3),  # provision again from the snapshot
    ([OK, OK, OK, FAIL, PEND], False, False, 0),  # ... unless the snapshot is gone
    ([OK, OK, OK, OK, FAIL], True, True, 4),  # only assign_ips
    ([OK, OK, OK, OK, FAIL], True, False, 3),  # the clone's volume is gone: provision again
    ([OK, OK, OK, OK, FAIL], False, False, 0),  # ... and so is the snapshot: from the start
])
def test_resume_index(states: list[StepState], snapshot_ok: bool, clone_ok: bool, expected: int) -> None:
    assert resume_index(states, snapshot_ok, clone_ok) == expected


def test_percent_counts_steps_bytes_and_the_report() -> None:
    steps = [("a", s, PEND) for s in CLONE_STEPS] + [("b", s, PEND) for s in CLONE_STEPS]
    assert percent(steps, {}, JobState.RUNNING) == 0
    half = [("a", s, OK) for s in CLONE_STEPS] + [("b", s, PEND) for s in CLONE_STEPS]
    assert percent(half, {}, JobState.RUNNING) == int(100 * 5 / 11)
    copying = [("a", s, OK if s.seq < Step.PROVISION.seq else PEND) for s in CLONE_STEPS]
    copying[Step.PROVISION.seq] = ("a", Step.PROVISION, StepState.RUNNING)
    assert percent(copying, {"a": 0.5}, JobState.RUNNING) == int(100 * 3.5 / 6)
    assert percent(copying, {"a": 7.0}, JobState.RUNNING) == int(100 * 4 / 6)  # never past the step
    done = [("a", s, OK) for s in CLONE_STEPS]
    assert percent(done, {}, JobState.RUNNING) == 83  # the report is still to run
    assert percent(done, {}, JobState.SUCCEEDED) == 100
    assert percent([("a", Step.QUIESCE, FAIL)], {}, JobState.FAILED) == 100


def test_verdict() -> None:
    assert verdict([OK] * 5, []) == JobState.SUCCEEDED
    assert verdict([OK] * 5, ["db: source could not be restarted"]) == JobState.FAILED
    assert verdict([OK, FAIL, OK, StepState.SKIPPED, StepState.SKIPPED], []) == JobState.FAILED
    assert verdict([OK, OK, OK, StepState.CANCELLED, StepState.CANCELLED], []) == JobState.CANCELLED
    assert verdict([OK, StepState.CANCELLED, OK, FAIL, PEND], []) == JobState.CANCELLED
    assert verdict([], []) == JobState.FAILED


def test_retry_policy_has_one_budget_and_a_cap() -> None:
    policy = RetryPolicy(attempts=3, base_s=1.0, cap_s=3.0, lock_wait_s=60)
    delays = [policy.delay(n) for n in range(1, 5)]
    assert delays[3] is None  # the fourth failure ends it
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 1.5 <= delays[2] <= 3.0
    assert all(policy.backoff(n) <= 3.0 for n in range(1, 40))
    assert all(0.1 <= policy.lock_wait_delay(w) <= 3.0 for w in range(0, 40))


def test_states_know_what_is_final() -> None:
    assert {s for s in JobState if s.done} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    assert not StepState.RETRYING.done and StepState.SKIPPED.done
    assert [s.seq for s in CLONE_STEPS] == list(range(5))
    assert NodeState.RUNNING.has_process and not NodeState.DESTROYED.has_process
