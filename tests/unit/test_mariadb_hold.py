"""How long mariadb-backup held commits, from its output (shared.stacks.mariadb_hold)."""

from __future__ import annotations

from shared.stacks.mariadb_hold import CommitHold


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _feed(hold: CommitHold, clock: Clock, lines: list[tuple[float, str]]) -> None:
    for at, line in lines:
        clock.now = at
        hold.seen(f"[00] 2026-12-07 13:03:35 {line}\n")


def test_the_hold_runs_from_asking_for_block_commit_to_the_tables_unlocked() -> None:
    clock = Clock()
    hold = CommitHold(clock)
    _feed(hold, clock, [(100.000, "Starting BACKUP STAGE BLOCK_DDL"),
                        (100.010, "Starting BACKUP STAGE BLOCK_COMMIT"),
                        (100.018, "Acquired locks for BACKUP STAGE BLOCK_COMMIT"),
                        (100.219, "Finishing BACKUP STAGE BLOCK_COMMIT"),
                        (100.220, "Executing BACKUP STAGE END"),
                        (100.2211, "All tables unlocked"),
                        (105.0, "completed OK!")])
    hold.done()
    assert hold.held_ms == 212  # 211.1 ms, rounded up


def test_no_block_commit_is_no_hold_and_any_hold_shows() -> None:
    clock = Clock()
    none = CommitHold(clock)
    _feed(none, clock, [(100.0, "Starting BACKUP STAGE START"), (101.0, "completed OK!")])
    none.done()
    assert none.held_ms == 0
    brief = CommitHold(clock)
    _feed(brief, clock, [(100.0, "Starting BACKUP STAGE BLOCK_COMMIT"), (100.0001, "All tables unlocked")])
    assert brief.held_ms == 1


def test_a_hold_never_seen_to_end_lasts_until_the_process_ended() -> None:
    clock = Clock()
    hold = CommitHold(clock)
    _feed(hold, clock, [(100.0, "Starting BACKUP STAGE BLOCK_COMMIT")])
    clock.now = 100.5  # the process died: the server ended the stage with its connection
    hold.done()
    clock.now = 200.0
    assert hold.held_ms == 500
