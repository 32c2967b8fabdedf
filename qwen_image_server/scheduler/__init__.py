"""The scheduler: one bounded queue in front of the engines (see `core.py` for its rules)."""

from qwen_image_server.scheduler.core import (
    Job,
    JobResult,
    RestartPolicy,
    Scheduler,
    SchedulerConfig,
    SchedulerObserver,
    SchedulerStats,
    SlotState,
    SlotStats,
)

__all__ = ["Job", "JobResult", "RestartPolicy", "Scheduler", "SchedulerConfig", "SchedulerObserver",
           "SchedulerStats", "SlotState", "SlotStats"]
