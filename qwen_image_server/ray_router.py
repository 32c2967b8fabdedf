"""The request router of the Ray Serve deployment: requests naming an id reach its owner.

Jobs and `url` images live in the memory of the replica that made them, and their ids start with
that replica's name (`api/replica.py`). Ray runs this router in every proxy (and in any handle
to the deployment), so it imports nothing heavier than Ray itself: no model code in the proxies.
"""

from __future__ import annotations

import pickle
import random
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from qwen_image_server.api.replica import owner_in_path

# The routing stat each replica reports (QwenImageDeployment.record_routing_stats): jobs queued
# or running in its scheduler.
BACKLOG_STAT = "backlog"
# Replicas offered to Ray per routing attempt, least loaded first.
CHOICES = 2


class ReplicaAffinityRouter(LocalityMixin, RequestRouter):
    """Requests whose path names an id go to the replica owning it; the rest to the least
    loaded replica on any node (jobs queued or running plus requests held), the nearest first
    among equals.

    When the owner is at its `max_ongoing_requests`, the request waits for it (Ray's backoff)
    rather than going to a replica that does not know the id. When the owner is gone (failed,
    scaled down), its jobs and images are gone too: the request goes anywhere and gets a 404.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._by_name: dict[str, RunningReplica] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._by_name = {r.replica_id.unique_id: r for r in replicas}

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._by_name.pop(replica_id.unique_id, None)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        owner = self._owner(pending_request)
        if pending_request is not None:
            # Every replica is considered at once: when the choices are full, wait (Ray's
            # backoff) rather than retry at once.
            pending_request.routing_context.should_backoff = True
        if owner is not None:
            return [[owner]]
        # By load across every node; being near (same node, then same zone) only breaks ties.
        # Ray's default tries its own node's replicas first and looks elsewhere only once they
        # are full (max_ongoing_requests, a whole queue): for image work that takes seconds,
        # an idle replica on another node beats a busy one next to the proxy by far.
        distance = {replica.replica_id: rank
                    for rank, near in enumerate(self.rank_replicas_via_locality(candidate_replicas))
                    for replica in near}
        ranked = sorted(candidate_replicas, key=lambda replica: (
            self._full(replica), self._load(replica), distance[replica.replica_id], random.random()))
        # The best two, in order: Ray takes the first unless it turns out full (it asks a
        # replica whose count says full), so a stale count costs one try, not a wait.
        return [[replica] for replica in ranked[:CHOICES]]

    def _full(self, replica: RunningReplica) -> bool:
        held = self.replica_queue_len_cache.get(replica.replica_id)
        return held is not None and held >= replica.max_ongoing_requests

    def _load(self, replica: RunningReplica) -> int:
        backlog = replica.routing_stats.get(BACKLOG_STAT, 0)  # as of the last routing-stats poll
        held = self.replica_queue_len_cache.get(replica.replica_id) or 0  # updated per request
        return int(backlog) + held

    def _owner(self, pending_request: PendingRequest | None) -> RunningReplica | None:
        path = http_path(pending_request)
        name = owner_in_path(path, self._by_name) if path else None
        return self._by_name.get(name) if name else None


def http_path(pending_request: PendingRequest | None) -> str | None:
    """The URL path of a request from a Ray HTTP proxy, else None.

    The proxy passes the replica the request's ASGI scope as one pickled argument (its
    `StreamingHTTPRequest`, made in this very process); Python handle calls pass other arguments.
    """
    if pending_request is None or not pending_request.args:
        return None
    arg = pending_request.args[0]
    if not isinstance(arg, bytes | bytearray):
        return None
    try:
        scope = pickle.loads(arg).asgi_scope
    except Exception:  # noqa: BLE001 - not a proxied HTTP request after all: no affinity
        return None
    return scope.get("path") if isinstance(scope, dict) else None
