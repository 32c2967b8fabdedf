"""Ray Serve autoscaling that sees async jobs, not only open HTTP requests.

Ray's default policy scales on the requests replicas hold open. A job answered with 202 holds
none: a replica with 30 jobs queued would look idle and could be scaled down, its queue cut
short. So each replica reports its unfinished async jobs (`record_autoscaling_stats`, Ray's
custom autoscaling metrics), and this policy adds them to the open requests before Ray's own
policy decides, with all its settings (target_ongoing_requests, delays, bounds) as they are.

Ray pickles this module by value into its controller: it imports nothing of the server.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

# The metric each replica reports: its async jobs queued or running.
ASYNC_JOBS_STAT = "async_jobs"
POLICY = f"{__name__}:backlog_policy"


def backlog_policy(ctx: AutoscalingContext) -> tuple[int | float, dict[str, Any]]:
    """Ray's default policy, counting every replica's async jobs as ongoing requests."""
    metrics = ctx.aggregated_metrics or {}
    backlog = sum(metrics.get(ASYNC_JOBS_STAT, {}).values())
    if not backlog:
        return replica_queue_length_autoscaling_policy(ctx)
    counted = AutoscalingContext(
        deployment_id=ctx.deployment_id,
        deployment_name=ctx.deployment_name,
        app_name=ctx.app_name,
        current_num_replicas=ctx.current_num_replicas,
        target_num_replicas=ctx.target_num_replicas,
        running_replicas=ctx.running_replicas,
        total_num_requests=ctx.total_num_requests + backlog,
        total_queued_requests=ctx.total_queued_requests,
        aggregated_metrics=ctx.aggregated_metrics,
        raw_metrics=ctx.raw_metrics,
        capacity_adjusted_min_replicas=ctx.capacity_adjusted_min_replicas,
        capacity_adjusted_max_replicas=ctx.capacity_adjusted_max_replicas,
        policy_state=ctx.policy_state,
        last_scale_up_time=ctx.last_scale_up_time,
        last_scale_down_time=ctx.last_scale_down_time,
        current_time=ctx.current_time,
        config=ctx.config,
    )
    return replica_queue_length_autoscaling_policy(counted)
