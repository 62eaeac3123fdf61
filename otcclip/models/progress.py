"""Progress and cancellation callbacks shared by every long-running core function.

The core never knows who is watching: the CLI passes a progress bar, a Celery task
passes a function that throttles writes to the job row, tests pass a list appender.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(stage, done, total)``: called as work advances; ``total`` may be 0 if unknown.
ProgressFn = Callable[[str, int, int], None]
#: ``should_stop()``: polled between batches; returning True cancels cooperatively.
StopFn = Callable[[], bool]


#: The unit each stage's ``done``/``total`` counts (a stage not listed counts "it").
#: ``ingest``/``encode``/``match``/``decide``/``finalize`` count pairs of the dataset
#: (``match`` converts the OT batches' shortlisted candidates to pairs), ``ot`` counts
#: shortlisted candidates, ``decode`` images, ``train`` optimizer steps, ``write`` files.
STAGE_UNITS = {"ingest": "pair", "encode": "pair", "match": "pair", "decide": "pair", "finalize": "pair",
               "write": "file", "decode": "image", "train": "step", "ot": "candidate"}


def stage_unit(stage: str | None) -> str:
    """The unit ``stage`` counts in (:data:`STAGE_UNITS`; "it" for any other stage)."""
    return STAGE_UNITS.get(stage or "", "it")


class Cancelled(Exception):
    """Raised by the core when ``should_stop()`` returned True."""


def no_progress(stage: str, done: int, total: int) -> None:
    """Default progress callback: does nothing."""


def never_stop() -> bool:
    """Default stop callback: never asks to stop."""
    return False


def check_stop(should_stop: StopFn | None) -> None:
    """Raise :class:`Cancelled` if ``should_stop`` says so."""
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled by caller")
