"""A tqdm bar per stage for the core's ``progress(stage, done, total)`` callbacks."""

from __future__ import annotations

import time
from typing import Any

from otcclip.models.progress import stage_unit


class StageBars:
    """One tqdm bar per stage, each with done/total in the stage's unit, a rate and an ETA.

    A stage's clock starts when the previous stage last reported (or at construction), so a
    stage that reports only its end (``decide``) still shows an honest rate. Bars go to
    stderr; with ``disable`` each finished stage prints one line there instead
    (``encode: 24 pair in 1.2 s (20.0 pair/s)``), and ``quiet`` prints nothing.
    """

    def __init__(self, *, disable: bool = False, leave: bool = True, quiet: bool = False) -> None:
        self.disable = disable or quiet
        self.quiet = quiet
        self.done = 0
        self.leave = leave
        self.stage: str | None = None
        self.bar: Any = None
        self.last = time.time()
        self.started = self.last
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.started = self.last
            if not self.disable:
                from tqdm import tqdm

                self.bar = tqdm(total=total or None, desc=f"{stage:>7}", unit=stage_unit(stage),
                                leave=self.leave, dynamic_ncols=True)
                self.bar.start_t = self.started
                self.bar.last_print_t = self.started
        self.done = int(done)
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.update(max(0, int(done) - int(self.bar.n)))
        self.seconds[stage] = now - self.started
        self.last = now

    def close(self) -> None:
        """Close the current bar, or print the stage's line when bars are off (call once at the end too)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.stage is not None and self.disable and not self.quiet:
            import sys

            secs = self.seconds.get(self.stage, 0.0)
            unit = stage_unit(self.stage)
            rate = f" ({self.done / secs:.1f} {unit}/s)" if secs > 0 else ""
            print(f"{self.stage}: {self.done} {unit} in {secs:.1f} s{rate}", file=sys.stderr, flush=True)
        self.stage = None
