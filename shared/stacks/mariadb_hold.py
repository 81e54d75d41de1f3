"""How long mariadb-backup held the server's commits, timed from its output as it is written (its
own timestamps have whole seconds). It holds them under BACKUP STAGE BLOCK_COMMIT, while it copies
the non-InnoDB tables' last changes and waits for its redo-log thread to reach the server's LSN --
usually a few ms, at times hundreds under load -- so the job reports that hold, not 0."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# New commits wait from the moment the stage is asked for; the line after BACKUP STAGE END has run
# says they go on.
HOLD_BEGINS = "Starting BACKUP STAGE BLOCK_COMMIT"
HOLD_ENDS = "All tables unlocked"


class CommitHold:
    """Feed it mariadb-backup's output lines as they come (``seen``); ``held_ms`` is the hold, 0 if
    none was seen, rounded up so that any hold shows. Times are when the lines are read: a reader
    that lags behind both markers would under-report (the reader does nothing else)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.began: float | None = None
        self.ended: float | None = None

    def seen(self, line: str) -> None:
        if self.began is None and HOLD_BEGINS in line:
            self.began = self.clock()
        elif self.began is not None and self.ended is None and HOLD_ENDS in line:
            self.ended = self.clock()

    def done(self) -> None:
        """The process ended: a hold not seen to end lasted until now."""
        if self.began is not None and self.ended is None:
            self.ended = self.clock()

    @property
    def held_ms(self) -> int:
        if self.began is None:
            return 0
        return max(1, math.ceil(((self.ended or self.clock()) - self.began) * 1000))
