"""The request router of the Ray Serve deployment: requests naming an id reach its owner; the
others the least loaded replica, on whichever node.

Jobs live in the memory of the replica that made them (and `url` images too, unless
QWEN_IMAGE_RESULTS_URL puts them in shared storage), and their ids start with that replica's
name (`api/replica.py`). Ray runs this router in every proxy (and in any handle
to the deployment), so it imports nothing heavier than Ray itself: no model code in the proxies.
"""

from __future__ import annotations

import pickle
import random
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ray.serve.request_router import (
    LocalityMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from qwen_image_server.api.replica import owner_in_path

if TYPE_CHECKING:
    from ray.serve._private.common import RequestMetadata

# The routing stat each replica reports (QwenImageDeployment.record_routing_stats): jobs queued
# or running in its scheduler.
BACKLOG_STAT = "backlog"
# Replicas offered to Ray per routing attempt, least loaded first.
CHOICES = 2
# A request handed a replica but never sent (its client left in between) reports no end: it
# stops counting after this long, far beyond any request's time in a replica.
FORGET_SENT_S = 3600.0


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
        # What this router gave each replica, ahead of Ray's counts (Ray counts a request once
        # it is sent, after routing has moved on: a burst would all see the same counts and go
        # to one replica). Requests being routed, by the replica offered first (internal id ->
        # replica, request), and requests handed a replica until they finish (id -> when).
        self._routing: dict[str, tuple[ReplicaID, PendingRequest]] = {}
        self._sent: dict[ReplicaID, dict[str, float]] = {}

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._by_name = {r.replica_id.unique_id: r for r in replicas}
        live = {r.replica_id for r in replicas}
        self._sent = {replica_id: sent for replica_id, sent in self._sent.items() if replica_id in live}

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._by_name.pop(replica_id.unique_id, None)
        self._sent.pop(replica_id, None)

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None,
    ) -> None:
        # Where Ray hands a request the replica it chose (the FIFO mixin's hook too).
        if request_metadata is not None:
            request_id = request_metadata.internal_request_id
            if self._routing.pop(request_id, None) is not None:
                self._sent.setdefault(replica.replica_id, {})[request_id] = time.monotonic()
        super()._fulfill_next_pending_request(replica, request_metadata)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._sent.get(replica_id, {}).pop(internal_request_id, None)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every replica is considered at once: when the choices are full, wait (Ray's
            # backoff) rather than retry at once.
            pending_request.routing_context.should_backoff = True
            self._routing.pop(pending_request.metadata.internal_request_id, None)  # a retry
        owner = self._owner(pending_request)
        if owner is not None:
            ranked = [owner]
        else:
            # By load across every node; being near (same node, then same zone) only breaks
            # ties. Ray's default tries its own node's replicas first and looks elsewhere only
            # once they are full (max_ongoing_requests, a whole queue): for image work that
            # takes seconds, an idle replica on another node beats a busy one next to the proxy.
            distance = {replica.replica_id: rank
                        for rank, near in enumerate(self.rank_replicas_via_locality(candidate_replicas))
                        for replica in near}
            mine = self._mine()
            ranked = sorted(candidate_replicas, key=lambda replica: (
                self._full(replica, mine), self._load(replica, mine), distance[replica.replica_id],
                random.random()))[:CHOICES]
        if pending_request is not None and ranked:
            self._routing[pending_request.metadata.internal_request_id] = (ranked[0].replica_id, pending_request)
        # In order: Ray takes the first unless it turns out full (it asks a replica whose count
        # says full), so a stale count costs one try, not a wait.
        return [[replica] for replica in ranked]

    def _mine(self) -> Counter[ReplicaID]:
        """Requests this router gave each replica that Ray may not count yet."""
        for request_id in [rid for rid, (_, request) in self._routing.items() if request.future.done()]:
            del self._routing[request_id]  # cancelled while being routed
        mine = Counter(replica_id for replica_id, _ in self._routing.values())
        forget = time.monotonic() - FORGET_SENT_S
        for replica_id, sent in self._sent.items():
            for request_id in [rid for rid, at in sent.items() if at < forget]:
                del sent[request_id]
            mine[replica_id] += len(sent)
        return mine

    def _held(self, replica: RunningReplica, mine: Counter[ReplicaID]) -> int:
        """Requests the replica holds: as it last told Ray (every proxy's), or as this router
        gave them since, whichever is more."""
        return max(self.replica_queue_len_cache.get(replica.replica_id) or 0, mine[replica.replica_id])

    def _full(self, replica: RunningReplica, mine: Counter[ReplicaID]) -> bool:
        return self._held(replica, mine) >= replica.max_ongoing_requests

    def _load(self, replica: RunningReplica, mine: Counter[ReplicaID]) -> int:
        backlog = replica.routing_stats.get(BACKLOG_STAT, 0)  # as of the last routing-stats poll
        return int(backlog) + self._held(replica, mine)

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
