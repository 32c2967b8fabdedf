"""A job's states and the events that move it between them, defined once.

The scheduler sets the states, the jobs API reports them (`JobStatus.status`), metrics count the
events, and the web page reads the list of final states from `/info` (`job_states`).
"""

from __future__ import annotations

from enum import Enum


class _Name(str, Enum):
    """A str enum that prints as its value (Python 3.11 changed `format()` of mixed-in enums)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


class JobState(_Name):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobEvent(_Name):
    """What listeners hear: entering a state, plus `started` (running), each denoising `step`,
    and a `preview` after the steps where the job asked for one (`Job.preview` holds it).

    `queued` is sent again whenever the job's place in the queue changes.
    """

    QUEUED = "queued"
    STARTED = "started"
    STEP = "step"
    PREVIEW = "preview"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self.value in {state.value for state in FINAL_STATES}

    @classmethod
    def entering(cls, state: JobState) -> JobEvent:
        """The event announcing `state` (`started` for running)."""
        return cls.STARTED if state is JobState.RUNNING else cls(state.value)
