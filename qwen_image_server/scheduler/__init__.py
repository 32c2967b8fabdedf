"""The scheduler: one bounded queue in front of the engines (`core.py` states its rules).

`queue.py` is the batching policy, `watchdog.py` the batch deadlines, `execute.py` runs a batch,
`slots.py` supervises the engines, `jobs.py` keeps the books; `Scheduler` is the face the rest of
the server uses.
"""

from qwen_image_server.scheduler.core import Scheduler, SchedulerStats
from qwen_image_server.scheduler.jobs import (
           Job,
           JobListener,
           JobResult,
           SchedulerObserver,
)
from qwen_image_server.scheduler.queue import BatchQueue, SchedulerConfig
from qwen_image_server.scheduler.slots import RestartPolicy, SlotState, SlotStats
from qwen_image_server.scheduler.watchdog import WatchdogConfig

__all__ = ["BatchQueue", "Job", "JobListener", "JobResult", "RestartPolicy", "Scheduler", "SchedulerConfig",
           "SchedulerObserver", "SchedulerStats", "SlotState", "SlotStats", "WatchdogConfig"]
