"""Scale-out on Ray Serve: the same app on many GPUs and machines, behind Ray's proxies.

`qwen-image serve --ray`, `serve run serve_config.yaml` and `serve deploy serve_config.yaml` deploy
`QwenImageDeployment`. Each replica builds the usual app with `create_app` (its own scheduler,
batching, jobs and model, on its own GPU); Ray Serve's proxies spread requests over the replicas
and bring replicas, autoscaling, backpressure, health checks and multi-node clusters.

* **Readiness.** A replica counts as started only once its model is loaded (`check_health`), so
  Ray neither routes to a loading replica nor kills a slow-loading one. A model that cannot load
  fails the deployment with the loader's message; a dead engine fails the health check, and Ray
  replaces the replica.
* **Affinity.** Jobs and `url` images live in the replica that made them. Their ids start with
  the replica's name (`api/replica.py`), and `ReplicaAffinityRouter` (`ray_router.py`) sends
  every request whose path names such an id to that replica; others go to the least loaded
  replica on any node (the proxy's own node only breaks ties).
* **Backpressure.** A replica takes `max_ongoing_requests` at once (its scheduler's queue plus a
  running batch, so it can batch everything it holds); beyond that requests wait in the proxy,
  up to `max_queued_requests`, then get 429 with Retry-After. Jobs, which do not hold a request
  open, meet the replica's own queue limit: 429 `queue_full` with Retry-After.
* **Which cluster.** `qwen-image serve --ray` joins the one named, or a live one started on
  this machine, or starts its own, and says which; a token the cluster refuses is one line.
* **Metrics.** Each replica's `/metrics` labels every sample with `replica`; Ray exports its own
  per-replica metrics (`ray_serve_*`) from every node.
* **Settings and secrets.** Replicas get the settings chosen where the application is built
  (flags, QWEN_IMAGE_* variables, .env, serve_config.yaml `args`) and read every other one from
  their own environment, defaults included (their own cache folder). Secrets (API keys, the
  metrics key) never travel with the deployment, which Ray stores and shows: each replica reads
  them from its environment, and says so in a warning when it serves without keys. A cluster
  that `qwen-image serve --ray` starts itself inherits its environment, keys included.

Only this module and `ray_router.py` import Ray (an optional extra); the plain server never does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray._private import (
    services,  # where `ray start` and `ray.init` look for a local cluster
)
from ray.exceptions import AuthenticationError
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from ray.serve.deployment import Application

from qwen_image_server.config.logs import configure_logging
from qwen_image_server.config.settings import SECRET_SETTINGS, Settings, setting_names
from qwen_image_server.engine.contract import Engine, settings_batch_limits
from qwen_image_server.errors import ModelLoadError
from qwen_image_server.launch.ray_autoscaling import ASYNC_JOBS_STAT
from qwen_image_server.launch.ray_autoscaling import POLICY as AUTOSCALING_POLICY
from qwen_image_server.launch.ray_router import BACKLOG_STAT, ReplicaAffinityRouter

if TYPE_CHECKING:
    from fastapi import FastAPI

    from qwen_image_server.api.context import ServerContext

log = logging.getLogger(__name__)

APP_NAME = "qwen-image"
DEPLOYMENT_NAME = "QwenImage"
# Ray asks the replica to finish its requests, then the app's own drain runs (queued jobs).
SHUTDOWN_MARGIN_S = 15.0
# How often Ray polls each replica's backlog for the router (Ray's default, 10 s, is long next
# to a job's few seconds).
ROUTING_STATS_PERIOD_S = 2.0


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class QwenImageDeployment:
    """One replica: the usual app (`create_app`), named after Ray's replica tag."""

    def __init__(self, settings: dict[str, Any], expected_secrets: Sequence[str] = ()) -> None:
        """`settings`: those chosen where the application was built (`replica_settings`); the
        rest, secrets included, come from this replica's own environment. `expected_secrets`:
        the secret settings the builder had (names only), to warn about those missing here."""
        # Imported here: the model code loads in replicas only, not in the driver or proxies.
        from qwen_image_server.api.app import create_app, real_engine_factory

        self.settings = Settings(_env_file=None, **settings)
        if "store" not in self.settings.model_fields_set:
            # A replica's own SQLite file would run its jobs again only if the same replica came
            # back, which Ray never does (a new replica has a new name and folder): each replica
            # keeps its jobs in memory unless a store is chosen.
            self.settings.store = "memory"
        self.replica: str = serve.get_replica_context().replica_tag
        warn_missing_secrets(self.settings, expected_secrets, self.replica)
        self._load_done = threading.Event()
        self._load_error: BaseException | None = None
        self._load = real_engine_factory(self.settings)
        self._server_app = create_app(self.settings, engine_factory=self._load_engine, replica=self.replica)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._server_app  # Ray runs its lifespan next, which starts the scheduler (and the load)

    def _load_engine(self) -> Engine:
        """The scheduler's engine factory (on its engine thread), remembering how loading went."""
        try:
            return self._load()
        except BaseException as exc:
            self._load_error = exc
            raise
        finally:
            self._load_done.set()

    async def record_routing_stats(self) -> dict[str, int]:
        """Polled by Ray for the router: this replica's jobs queued or running."""
        ctx: ServerContext | None = getattr(self._server_app.state, "ctx", None)
        stats = ctx.scheduler.stats() if ctx else None
        return {BACKLOG_STAT: stats.queue_length + stats.running_batch_size if stats else 0}

    async def record_autoscaling_stats(self) -> dict[str, int]:
        """Polled by Ray for the autoscaler: this replica's async jobs queued or running, which
        hold no HTTP request open (see ray_autoscaling.py)."""
        ctx: ServerContext | None = getattr(self._server_app.state, "ctx", None)
        return {ASYNC_JOBS_STAT: ctx.jobs.unfinished_count() if ctx else 0}

    async def check_health(self) -> None:
        """Raise (so Ray fails the start, or replaces the replica) when the engine cannot serve.

        Ray calls this first as the last step of the replica's start, right after the app's
        lifespan began loading the model, and routes nothing to the replica until it returns;
        that start has no deadline (Ray only warns about slow starts). So waiting here for the
        model keeps requests away from a loading replica without Ray killing a slow-loading one.
        Later calls (every health_check_period_s, with a deadline) find the model loaded and
        only look at the engine, like /ready minus draining (a draining replica is Ray's doing).
        """
        if not self._load_done.is_set():
            await asyncio.to_thread(self._load_done.wait)
        if self._load_error is not None:
            raise ReplicaUnfit(load_failure(self._load_error))
        ctx: ServerContext = self._server_app.state.ctx
        if ctx.scheduler.dead:
            raise ReplicaUnfit(f"Replica {self.replica}: the model engine failed (a device error); "
                               "it needs a fresh process.")


def warn_missing_secrets(settings: Settings, expected: Sequence[str], replica: str) -> None:
    """A replica without API keys serves anyone who reaches Ray's proxies: say so, and say why
    when the application was built with keys (they are never sent to replicas)."""
    if not settings.accepted_keys:
        why = ("the application was built with API keys, but replicas read theirs from their own "
               "environment" if "api_keys" in expected else "its environment has none")
        log.warning("replica %s serves without API keys (%s): anyone who reaches Ray's proxies can run jobs "
                    "and fetch images; set QWEN_IMAGE_API_KEYS where `ray start` runs on its node",
                    replica, why)
    for name in expected:
        if name != "api_keys" and not getattr(settings, name):
            log.warning("replica %s has no %s (the application was built with one; replicas read it from "
                        "their own environment): set QWEN_IMAGE_%s where `ray start` runs on its node",
                        replica, name, name.upper())


class ReplicaUnfit(RuntimeError):
    """`check_health`'s verdict; its message is what `deploy_failure` shows a person."""


def load_failure(exc: BaseException) -> str:
    """The one paragraph a person reads when the model does not load."""
    if isinstance(exc, ModelLoadError):
        return str(exc)
    return f"The model failed to load: {type(exc).__name__}: {exc}"


def deploy_failure(app_name: str = APP_NAME) -> str:
    """Why the application failed to deploy: a replica's own verdict when there is one.

    Ray reports a failed start as the replica's whole traceback; the verdict is its last line.
    """
    app = serve.status().applications.get(app_name)
    if app is None:
        return f"the application {app_name!r} is not deployed"
    marker = f"{ReplicaUnfit.__name__}: "
    for deployment in app.deployments.values():
        if marker in deployment.message:
            return deployment.message.rsplit(marker, 1)[1].strip()
    return app.message


# -- deployment options --------------------------------------------------------------------

def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def gpus_per_replica(settings: Settings, cluster_gpus: float) -> float:
    """`ray_num_gpus`, else one GPU per replica where the cluster has GPUs and CUDA may be used."""
    if settings.ray_num_gpus is not None:
        return settings.ray_num_gpus
    return 1.0 if cluster_gpus > 0 and settings.device in ("auto", "cuda") else 0.0


def deployment_options(settings: Settings, cluster_gpus: float) -> dict[str, Any]:
    """Ray Serve options of the deployment, from the settings and the cluster's GPU count."""
    num_gpus = gpus_per_replica(settings, cluster_gpus)
    # The replica's own batching defaults (device type of the replica, not of this machine).
    batch = settings_batch_limits(settings, "cuda" if num_gpus > 0 else "cpu").max_batch_size
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus},
        # As many as the replica's scheduler holds: a full queue plus the running batch. Fewer
        # would starve its batching; more would only meet its own 429 while another replica
        # had room. Beyond it, requests wait in the proxy, where any replica may take them.
        "max_ongoing_requests": settings.ray_max_ongoing_requests or settings.max_queue + batch,
        "max_queued_requests": (settings.max_queue if settings.ray_max_queued_requests is None
                                else settings.ray_max_queued_requests),
        # Ray's proxy answers 503 without Retry-After by default; clients retry on 429 + Retry-After.
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=settings.ray_retry_after_s),
        "graceful_shutdown_timeout_s": settings.drain_timeout_s + SHUTDOWN_MARGIN_S,
        "request_router_config": RequestRouterConfig(
            request_router_class=ReplicaAffinityRouter,
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
    }
    if settings.ray_autoscaling is not None:
        # Aim at one batch running and one waiting per replica unless told otherwise; count the
        # async jobs replicas hold as requests (ray_autoscaling.py), unless told another policy.
        options["autoscaling_config"] = {"target_ongoing_requests": 2 * batch,
                                         "policy": {"policy_function": AUTOSCALING_POLICY},
                                         **settings.ray_autoscaling}
    elif settings.ray_replicas is not None:
        options["num_replicas"] = settings.ray_replicas
    else:
        options["num_replicas"] = max(1, int(cluster_gpus // num_gpus)) if num_gpus > 0 else 1
    return options


def replica_settings(settings: Settings) -> dict[str, Any]:
    """What every replica is built from (as JSON): the settings chosen where the application is
    built, from flags, QWEN_IMAGE_* variables, .env or serve_config.yaml `args`. Left out, for
    each replica to work out in its own environment: the defaults (a replica reads its own
    QWEN_IMAGE_* for those, and its cache folder is in its own home), and the secrets, which
    Ray would store and show with the deployment's arguments."""
    return settings.model_dump(mode="json", exclude_unset=True, exclude=set(SECRET_SETTINGS))


def expected_secrets(settings: Settings) -> list[str]:
    """The names (never the values) of the secret settings the application was built with."""
    return sorted(name for name in SECRET_SETTINGS if getattr(settings, name))


def secret_environment(settings: Settings) -> dict[str, str]:
    """The secret settings as the variables replicas read them from."""
    env = {}
    if settings.api_keys:
        env["QWEN_IMAGE_API_KEYS"] = ",".join(key.get_secret_value() for key in settings.api_keys)
    if settings.metrics_key is not None:
        env["QWEN_IMAGE_METRICS_KEY"] = settings.metrics_key.get_secret_value()
    if settings.files_secret is not None:
        env["QWEN_IMAGE_FILES_SECRET"] = settings.files_secret.get_secret_value()
    return env


def build_app(settings: Settings) -> Application:
    """The Ray Serve application: QwenImageDeployment with options from `settings`."""
    options = deployment_options(settings, _cluster_gpus())
    # serve.deployment made the class a Deployment (which has `options`); mypy still sees the class.
    deployment = QwenImageDeployment.options(**options)  # type: ignore[attr-defined]
    return deployment.bind(replica_settings(settings), expected_secrets(settings))


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path` of serve_config.yaml: `args` are settings (QWEN_IMAGE_* fill in the rest).

    Secrets are refused there: Ray keeps the config and shows it in plain text (`serve config`,
    the dashboard, a KubeRay RayService), and replicas read them from their own environment."""
    for name in sorted(SECRET_SETTINGS):
        if given := sorted(setting_names(name) & args.keys()):
            raise ValueError(
                f"{given[0]!r} in serve_config.yaml's args would be kept and shown in plain text by Ray; "
                f"set QWEN_IMAGE_{name.upper()} in the environment of the nodes that run replicas instead "
                "(where `ray start` runs, e.g. from a Kubernetes Secret)")
    return build_app(Settings(**args))


# -- qwen-image serve --ray ----------------------------------------------------------------

@dataclass(frozen=True)
class ClusterChoice:
    """Which Ray cluster `qwen-image serve --ray` uses, as `ray.init` wants it, and in words."""

    address: str
    joins: bool  # an existing cluster (else a new local one that lives as long as the server)
    named_by: str


def choose_cluster(settings: Settings, temp_dir: str | None = None) -> ClusterChoice:
    """`ray_address`, else RAY_ADDRESS, else a live cluster that `ray start` left on this
    machine, else a new local one.

    Ray alone would also try the last cluster started on this machine when it is gone (its
    address stays in /tmp/ray/ray_current_cluster after a crash) and fail; a dead one is
    skipped here, so the server starts its own instead.
    """
    if settings.ray_address:
        return ClusterChoice(settings.ray_address, joins=settings.ray_address != "local",
                             named_by="ray_address")
    if os.environ.get("RAY_ADDRESS"):
        return ClusterChoice(os.environ["RAY_ADDRESS"], joins=os.environ["RAY_ADDRESS"] != "local",
                             named_by="RAY_ADDRESS")
    last = services.find_bootstrap_address(temp_dir)
    if last and last in services.find_gcs_addresses():
        # "auto" rather than the address: Ray then also picks up this machine's token file.
        return ClusterChoice("auto", joins=True, named_by=f"the cluster started on this machine ({last})")
    return ClusterChoice("local", joins=False, named_by="no cluster named or running here")


def connect(choice: ClusterChoice) -> str | None:
    """Join or start the cluster; a one-line reason when that fails (token, address)."""
    where = f"the Ray cluster at {choice.address}" if choice.address != "auto" else choice.named_by
    if choice.joins:
        log.info("joining %s (%s)", where, choice.named_by)
        refused = token_refusal(choice.address)
        if refused is not None:
            return f"{where} {refused}"
    try:
        ray.init(address=choice.address)
    except (ConnectionError, TimeoutError, ValueError) as exc:
        return f"cannot connect to {where} ({choice.named_by}): {exc}"
    return None


def token_refusal(address: str) -> str | None:
    """Why the cluster's GCS refuses this machine's token, if it does (else None).

    Asked once up front: `ray.init` retries a refused connection for ~20 s (a warning a second)
    and then reports it as a failure to connect. Left to `ray.init`: a Ray Client address
    (ray://), and "auto", for which it first looks for this machine's token file itself.
    """
    if address == "auto" or address.startswith("ray://"):
        return None
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # what `ray start --address` asks first

    with held_stderr() as held:  # the core's warning about the refusal, superseded by the reason
        try:
            GcsClient(address=services.canonicalize_bootstrap_address(address))
        except AuthenticationError:
            held.drop()
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                return ("uses token authentication: set RAY_AUTH_MODE=token and the cluster's token "
                        "in RAY_AUTH_TOKEN (or the file ~/.ray/auth_token, or a file named by "
                        "RAY_AUTH_TOKEN_PATH)")
            return ("refused this machine's token: RAY_AUTH_TOKEN (or ~/.ray/auth_token, or "
                    "RAY_AUTH_TOKEN_PATH) must hold the token the cluster was started with")
        except Exception:  # noqa: BLE001 - anything else: ray.init says it in its own words
            return None
    return None


class _HeldStderr:
    def __init__(self) -> None:
        self.dropped = False

    def drop(self) -> None:
        self.dropped = True


@contextmanager
def held_stderr() -> Iterator[_HeldStderr]:
    """Send what this process writes to stderr (Ray's C++ core included) to a file meanwhile,
    and write it out at the end unless `drop()` was called. Never around starting processes:
    they would keep the file as their stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    held = _HeldStderr()
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not held.dropped:
                file.seek(0)
                sys.stderr.buffer.write(file.read())
                sys.stderr.flush()


def describe_cluster(choice: ClusterChoice) -> str:
    resources = ray.cluster_resources()
    size = (f"{len([n for n in ray.nodes() if n['Alive']])} node(s), {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs")
    if choice.joins:
        return f"joined the Ray cluster at {ray.get_runtime_context().gcs_address} ({choice.named_by}; {size})"
    return (f"started a local Ray cluster ({size}; {choice.named_by}); it stops with this server. "
            "To use a running cluster, set RAY_ADDRESS or --ray-address")


def run_ray(settings: Settings) -> int:
    """Deploy on Ray Serve (joining or starting a cluster) and serve until SIGINT / SIGTERM."""
    configure_logging(settings.log_level)
    choice = choose_cluster(settings)
    if not choice.joins:
        # The cluster's processes start from this one and inherit its environment: so its
        # replicas get keys given as flags or in .env too, without Ray ever holding them.
        os.environ.update(secret_environment(settings))
    elif expected_secrets(settings):
        log.warning("replicas on a cluster this command did not start read their API keys and metrics key "
                    "from their own environment, never from here: set QWEN_IMAGE_API_KEYS (and "
                    "QWEN_IMAGE_METRICS_KEY) where `ray start` runs on every node")
    problem = connect(choice)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    log.info("%s", describe_cluster(choice))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")  # waits for the models
    except RuntimeError:
        from qwen_image_server.serving.lifecycle import EXIT_LOAD_FAILED

        print(f"error: {deploy_failure()}", file=sys.stderr)
        serve.delete(APP_NAME)
        ray.shutdown()
        return EXIT_LOAD_FAILED
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
        ray.shutdown()
        return 130
    log.info("serving on http://%s:%d through Ray Serve (application %r); Ctrl+C to stop",
             settings.host, settings.port, APP_NAME)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    log.info("stopping: the replicas finish their requests (up to %.0f s)",
             settings.drain_timeout_s + SHUTDOWN_MARGIN_S)
    serve.delete(APP_NAME)
    ray.shutdown()
    return 0
