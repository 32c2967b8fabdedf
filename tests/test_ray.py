"""Scale-out on Ray Serve: a real local Ray instance, two replicas of the tiny model, and real
HTTP through Ray's proxy, as a client of a Ray deployment sees it.

The replicas take few requests at once (MAX_ONGOING) so that requests also wait in Ray's proxy,
where its queue limit (MAX_QUEUED) and a replica's death show.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install .[ray]")
from ray import cloudpickle, serve  # noqa: E402
from ray.serve._private.build_app import build_app as ray_build_app  # noqa: E402
from ray.serve._private.common import (  # noqa: E402
    DeploymentHandleSource,
    DeploymentID,
    RequestMetadata,
)
from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402
from ray.serve.deployment import Application  # noqa: E402
from ray.serve.request_router import PendingRequest, ReplicaID  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from qwen_image_server.api.replica import owner_in_path  # noqa: E402
from qwen_image_server.config.settings import SECRET_SETTINGS, Settings  # noqa: E402
from qwen_image_server.errors import ModelLoadError  # noqa: E402
from qwen_image_server.launch.ray_app import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    ClusterChoice,
    QwenImageDeployment,
    ReplicaUnfit,
    app_builder,
    build_app,
    choose_cluster,
    deploy_failure,
    deployment_options,
    replica_settings,
    run_ray,
)
from qwen_image_server.launch.ray_autoscaling import ASYNC_JOBS_STAT, backlog_policy  # noqa: E402
from qwen_image_server.launch.ray_autoscaling import POLICY as AUTOSCALING_POLICY  # noqa: E402
from qwen_image_server.launch.ray_router import BACKLOG_STAT, ReplicaAffinityRouter  # noqa: E402
from tests.conftest import ROOT, free_port, run_cli, tiny_settings, wait_until  # noqa: E402

pytestmark = pytest.mark.slow

REPLICAS = 2
MAX_ONGOING = 2  # requests one replica takes at once; more wait in Ray's proxy
MAX_QUEUED = 8  # requests the proxy holds, then 429
RETRY_AFTER_S = 7
MAX_QUEUE = 3  # each replica's own scheduler queue (jobs meet it)
BODY = {"prompt": "a lighthouse at dusk", "aspect_ratio": "s1:1", "num_inference_steps": 2,
        "add_overlay": False}
ANSWER_TIMEOUT = 240.0  # no request may take longer than this to get an answer
PNG = b"\x89PNG\r\n\x1a\n"
DEPLOYMENT_ID = DeploymentID(name=DEPLOYMENT_NAME, app_name=APP_NAME)
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
API_KEY = "replica-key-4c9e1b7d"
METRICS_KEY = "metrics-key-0a3f58e2"


@dataclass
class Deployment:
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=ANSWER_TIMEOUT)

    def replica_names(self) -> set[str]:
        assert running_replicas() == REPLICAS
        return set(replica_actors())


def replica_actors() -> dict[str, str]:
    """Live replica name -> its actor's name (what `ray.kill` needs)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return {a["name"].removeprefix(prefix): a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def ray_auth() -> Iterator[None]:
    """Token authentication (Ray turns it on for every new local cluster) with a token of the
    tests' own, so that no ~/.ray/auth_token is needed, made or read."""
    saved = {name: os.environ.pop(name, None) for name in AUTH_VARIABLES}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, ray_auth) -> Iterator[Deployment]:
    port = free_port()
    # A cluster of its own ("local"), never whatever cluster this machine ran last; in a short
    # folder of its own too (Ray's socket paths must stay short).
    with tempfile.TemporaryDirectory(prefix="qis-ray-") as temp_dir:
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _temp_dir=temp_dir)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = tiny_settings(
                tmp_path_factory.mktemp("ray"), threads=1, max_batch_size=1, max_queue=MAX_QUEUE,
                ray_replicas=REPLICAS, ray_max_ongoing_requests=MAX_ONGOING,
                ray_max_queued_requests=MAX_QUEUED, ray_retry_after_s=RETRY_AFTER_S)
            serve.run(build_app(settings), name=APP_NAME, route_prefix="/")  # returns once both loaded
            yield Deployment(f"http://127.0.0.1:{port}")
        finally:
            serve.shutdown()
            ray.shutdown()


def burst(url: str, bodies: list[dict], path: str = "/generate") -> list[httpx.Response]:
    """POST every body at once; every request must get an answer within ANSWER_TIMEOUT."""

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(send_all())


def seeds(n: int) -> list[dict]:
    return [{**BODY, "seed": seed} for seed in range(n)]


def replica_infos(deployment: Deployment, idle: bool = False) -> dict[str, dict]:
    """/info of every replica (through the proxy, which picks one each time); with `idle`,
    once each has nothing queued or running."""
    names = deployment.replica_names()
    infos: dict[str, dict] = {}
    with deployment.client() as client:
        def every_replica_answered() -> bool:
            response = client.get("/info")
            info, name = response.json(), response.headers["x-replica"]
            busy = info["scheduler"]["queue_length"] or info["scheduler"]["running_batch_size"]
            if idle and busy:
                infos.pop(name, None)
            else:
                infos[name] = info
            return infos.keys() == names

        wait_until(every_replica_answered, ANSWER_TIMEOUT, "/info of every replica", interval=0.2)
    return infos


def wait_idle(deployment: Deployment) -> dict[str, dict]:
    return replica_infos(deployment, idle=True)


def job_finished(client: httpx.Client, job_id: str) -> bool:
    status = client.get(f"/v1/jobs/{job_id}").json()["status"]
    return status in ("succeeded", "failed", "cancelled")


# -- without a cluster ------------------------------------------------------------------------

def test_an_id_names_the_replica_that_owns_it() -> None:
    live = {"abc12345", "zz9"}
    assert owner_in_path("/v1/jobs/abc12345.3f2c/events", live) == "abc12345"
    assert owner_in_path("/v1/images/zz9.x-Y_z", live) == "zz9"
    assert owner_in_path("/v1/jobs/gone0000.3f2c", live) is None  # its replica is gone
    assert owner_in_path("/files/Qwen-Image-20231212_153045-req5.png", live) is None
    assert owner_in_path("/generate", live) is None


def test_the_deployment_gets_one_gpu_per_replica_and_room_to_batch(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, max_batch_size=None)
    on_gpus = deployment_options(settings, cluster_gpus=8)
    assert on_gpus["num_replicas"] == 8 and on_gpus["ray_actor_options"] == {"num_gpus": 1.0}
    # A full queue plus a running batch (4 on a GPU), then the proxy holds up to a queue more.
    assert on_gpus["max_ongoing_requests"] == settings.max_queue + 4
    assert on_gpus["max_queued_requests"] == settings.max_queue
    assert on_gpus["backpressure_config"].status_code == 429
    assert on_gpus["backpressure_config"].retry_after_s == settings.ray_retry_after_s
    on_cpu = deployment_options(settings, cluster_gpus=0)
    assert on_cpu["num_replicas"] == 1 and on_cpu["ray_actor_options"] == {"num_gpus": 0.0}
    assert on_cpu["max_ongoing_requests"] == settings.max_queue + 1
    scaled = deployment_options(tiny_settings(tmp_path, ray_autoscaling={"max_replicas": 6}), 8)
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"target_ongoing_requests": 8, "max_replicas": 6,
                                            "policy": {"policy_function": AUTOSCALING_POLICY}}


def test_the_autoscaler_counts_a_replicas_async_jobs_as_load() -> None:
    """Ray's own policy and context: 30 jobs answered with 202 hold no request open, yet they are
    the replica's load; without them Ray would call it idle."""
    config = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=4,
                               upscale_delay_s=0, downscale_delay_s=0,
                               policy={"policy_function": AUTOSCALING_POLICY})
    replica = ReplicaID("r1", DeploymentID("QwenImage", "qwen-image"))

    def context(async_jobs: float, policy_state: dict) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=replica.deployment_id, deployment_name="QwenImage", app_name="qwen-image",
            current_num_replicas=1, target_num_replicas=1, running_replicas=[replica], total_num_requests=0.0,
            total_queued_requests=0.0, aggregated_metrics={ASYNC_JOBS_STAT: {replica: async_jobs}}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state=policy_state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=config)

    assert replica_queue_length_autoscaling_policy(context(30, {}))[0] <= 1  # Ray alone: idle
    assert backlog_policy(context(30, {}))[0] >= 4  # 30 jobs at 4 per replica: up (Ray caps it at 4)
    assert backlog_policy(context(4, {}))[0] <= 1  # a replica's worth: stays as it is


class WatchedEvent(threading.Event):
    """An Event that says when someone waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_on = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waited_on.set()
        return super().wait(timeout)


def test_the_health_check_waits_for_the_model_and_fails_a_dead_engine() -> None:
    # The replica's own check_health, on a stand-in for its app (a real engine cannot be made to
    # fail on demand): Ray starts routing when it returns and replaces the replica when it raises.
    check_health = QwenImageDeployment.func_or_class.check_health
    scheduler = SimpleNamespace(dead=False)
    replica = SimpleNamespace(
        replica="r1", _load_done=WatchedEvent(), _load_error=None,
        _server_app=SimpleNamespace(state=SimpleNamespace(ctx=SimpleNamespace(scheduler=scheduler))))

    async def check_while_loading() -> None:
        check = asyncio.ensure_future(check_health(replica))
        assert await asyncio.to_thread(replica._load_done.waited_on.wait, 30), "never waited for the load"
        assert not check.done()  # waiting for the load: not started yet
        replica._load_done.set()
        await check  # loaded: healthy

    asyncio.run(check_while_loading())
    scheduler.dead = True
    with pytest.raises(ReplicaUnfit, match="engine failed"):
        asyncio.run(check_health(replica))
    replica._load_error = ModelLoadError("Could not load the model 'x': the folder does not exist.")
    with pytest.raises(ReplicaUnfit, match="^Could not load the model 'x'"):
        asyncio.run(check_health(replica))


def test_the_serve_config_file_deploys_the_same_app() -> None:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    [app] = config["applications"]
    assert app["import_path"] == "qwen_image_server.launch.ray_app:app_builder"
    assert isinstance(app_builder(app["args"]), Application)
    assert Settings(**app["args"]).model == app["args"]["model"]
    # Config files written for earlier versions name the old import path; it still builds the app.
    from ray.serve._private.utils import import_attr

    assert import_attr("qwen_image_server.ray_serve:app_builder") is app_builder


def test_a_setting_the_config_leaves_out_comes_from_the_environment(monkeypatch) -> None:
    # `serve deploy` builds the application on the cluster, where QWEN_IMAGE_* fill in the args.
    monkeypatch.setenv("QWEN_IMAGE_MODEL", "/models/from-the-environment")
    args = {key: value for key, value in yaml.safe_load((ROOT / "serve_config.yaml").read_text())
            ["applications"][0]["args"].items() if key != "model"}
    replica_settings = app_builder(args)._bound_deployment.init_args[0]
    assert replica_settings["model"] == "/models/from-the-environment"
    assert replica_settings["ray_num_gpus"] == args["ray_num_gpus"]


def test_replicas_get_the_settings_chosen_and_never_a_secret(monkeypatch) -> None:
    # Where the application is built (`serve deploy`'s build task, or `qwen-image serve --ray`):
    # keys and a setting in its environment, others in args, the rest left to the defaults.
    monkeypatch.setenv("QWEN_IMAGE_API_KEYS", API_KEY)
    monkeypatch.setenv("QWEN_IMAGE_METRICS_KEY", METRICS_KEY)
    monkeypatch.setenv("QWEN_IMAGE_MAX_QUEUE", "9")
    app = app_builder({"model": "tiny", "ray_num_gpus": 0})
    shipped = cloudpickle.dumps(ray_build_app(app, name=APP_NAME))  # what serve.run hands to Ray
    assert API_KEY.encode() not in shipped and METRICS_KEY.encode() not in shipped
    settings, expected_secrets = app._bound_deployment.init_args
    assert (settings["model"], settings["ray_num_gpus"], settings["max_queue"]) == ("tiny", 0, 9)
    assert not SECRET_SETTINGS & settings.keys()
    assert "cache_dir" not in settings  # each replica's own home, not this machine's
    assert expected_secrets == ["api_keys", "metrics_key"]  # names, for the replicas' warnings
    # In args, a key would be kept and shown by Ray with the config: refused, naming the variable.
    for name, variable in (("api_keys", "QWEN_IMAGE_API_KEYS"), ("api_key", "QWEN_IMAGE_API_KEYS"),
                           ("metrics_key", "QWEN_IMAGE_METRICS_KEY")):
        with pytest.raises(ValueError, match=variable):
            app_builder({"model": "tiny", name: "k"})


def test_serve_ray_passes_replicas_what_its_flags_and_environment_set(monkeypatch) -> None:
    monkeypatch.setenv("QWEN_IMAGE_MODEL", "tiny")
    deployed: list[Settings] = []
    monkeypatch.setattr("qwen_image_server.cli.serve_on_ray", lambda settings: deployed.append(settings) or 0)
    assert run_cli("serve", "--ray", "--max-queue", "5") == 0
    settings = replica_settings(deployed[0])
    assert (settings["model"], settings["max_queue"]) == ("tiny", 5)
    assert "cache_dir" not in settings and "port" not in settings  # defaults: the replica's own


def test_serve_ray_hands_its_keys_to_a_cluster_it_starts_only(tmp_path: Path, monkeypatch) -> None:
    # Processes of a cluster that `serve --ray` starts inherit its environment; one it joins does not.
    for name in ("QWEN_IMAGE_API_KEYS", "QWEN_IMAGE_METRICS_KEY", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "placeholder")  # so that the test's end restores the absence
        monkeypatch.delenv(name)
    environ_at_connect: list[tuple[str | None, str | None]] = []

    def connect(choice: ClusterChoice) -> str:
        environ_at_connect.append((os.environ.get("QWEN_IMAGE_API_KEYS"), os.environ.get("QWEN_IMAGE_METRICS_KEY")))
        return "stopped here by the test"

    monkeypatch.setattr("qwen_image_server.launch.ray_app.connect", connect)
    for address in ("head:6379", "local"):  # as --api-key and --metrics-key give them
        assert run_ray(tiny_settings(tmp_path, ray_address=address, api_keys=API_KEY, metrics_key=METRICS_KEY)) == 1
    assert environ_at_connect == [(None, None), (API_KEY, METRICS_KEY)]


def test_serve_ray_never_joins_a_cluster_that_is_gone(tmp_path: Path, monkeypatch) -> None:
    # A cluster stopped by killing its processes leaves its address behind.
    (tmp_path / "ray_current_cluster").write_text("127.0.0.1:1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    settings = tiny_settings(tmp_path)
    started = choose_cluster(settings, temp_dir=str(tmp_path))
    assert started.address == "local" and not started.joins
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert choose_cluster(settings, str(tmp_path)) == ClusterChoice("head:6379", True, "RAY_ADDRESS")
    named = choose_cluster(tiny_settings(tmp_path, ray_address="ray://head:10001"), str(tmp_path))
    assert named == ClusterChoice("ray://head:10001", True, "ray_address")


class StandInReplica:
    """What the router reads of a replica: its id, node, routing stats and request limit."""

    def __init__(self, name: str, node: str) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT_ID)
        self.node_id, self.availability_zone = node, None
        self.routing_stats = {BACKLOG_STAT: 0}
        self.max_ongoing_requests = MAX_ONGOING
        self.multiplexed_model_ids: set[str] = set()

    async def get_queue_len(self, deadline_s: float) -> int:  # Ray asks when its count is old
        return 0


def test_the_router_sends_work_to_the_least_loaded_node_its_own_among_equals() -> None:
    # Ray's own routing loop (as in a proxy on "proxy-node"), with stand-ins for the replicas.
    async def route() -> list[list[str]]:
        router = ReplicaAffinityRouter(
            deployment_id=DEPLOYMENT_ID, handle_source=DeploymentHandleSource.UNKNOWN,
            self_node_id="proxy-node", prefer_local_node_routing=True, use_replica_queue_len_cache=True)
        local, remote = StandInReplica("local000", "proxy-node"), StandInReplica("remote00", "other-node")
        router.update_replicas([local, remote])
        counter = iter(range(1000))
        running: list[tuple[ReplicaID, str]] = []

        async def send(n: int) -> list[str]:
            requests = [PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(str(i), str(i)))
                        for i in (next(counter) for _ in range(n))]
            chosen = await asyncio.gather(*(router._choose_replica_for_request(r) for r in requests))
            running.extend((replica.replica_id, r.metadata.internal_request_id)
                           for replica, r in zip(chosen, requests, strict=True))
            return [replica.replica_id.unique_id for replica in chosen]

        def finish_all() -> None:  # what Ray tells the router as each request ends
            while running:
                router.on_request_completed(*running.pop())

        alone = await send(1)  # both idle: the proxy's own node
        finish_all()
        burst = await send(MAX_ONGOING * 2)  # at once: half each, not all on the proxy's node
        finish_all()
        local.routing_stats = {BACKLOG_STAT: 3}  # jobs waiting on the proxy's node
        queued_jobs = await send(1)
        return [alone, sorted(burst), queued_jobs]

    assert asyncio.run(route()) == [
        ["local000"], ["local000"] * MAX_ONGOING + ["remote00"] * MAX_ONGOING, ["remote00"]]


# -- through Ray's proxy --------------------------------------------------------------------

def test_info_and_a_header_name_the_replica_that_answered(deployment: Deployment) -> None:
    names = deployment.replica_names()
    seen: set[str] = set()
    with deployment.client() as client:
        def every_replica_answered() -> bool:
            response = client.get("/info")
            assert response.status_code == 200
            assert response.json()["replica"] == response.headers["x-replica"]
            seen.add(response.headers["x-replica"])
            return seen == names

        wait_until(every_replica_answered, 60, "/info from every replica")
        missing = client.get("/v1/jobs/nope")  # errors are named too
        assert missing.status_code == 404 and missing.headers["x-replica"] in names
        metrics = client.get("/metrics")  # one replica's numbers, labelled with its name
        label = f'replica="{metrics.headers["x-replica"]}"'
        assert all(label in line for line in metrics.text.splitlines() if line.startswith("qwen_image_"))


def test_two_replicas_share_concurrent_load(deployment: Deployment) -> None:
    # More requests than one replica takes at once, fewer than the proxy holds: all succeed.
    responses = burst(deployment.url, seeds(2 * MAX_ONGOING + 2))
    assert [r.status_code for r in responses] == [200] * len(responses)
    assert all(r.content.startswith(PNG) for r in responses)
    assert {r.headers["x-replica"] for r in responses} == deployment.replica_names()


def test_a_jobs_requests_reach_the_replica_that_owns_it(deployment: Deployment) -> None:
    created = burst(deployment.url, seeds(4), path="/v1/jobs")
    assert [r.status_code for r in created] == [202] * 4
    jobs = {r.json()["id"]: r.headers["x-replica"] for r in created}
    assert all(job_id.startswith(f"{owner}.") for job_id, owner in jobs.items())
    with deployment.client() as client:
        last = list(jobs)[-1]
        with client.stream("GET", f"/v1/jobs/{last}/events") as events:
            assert events.status_code == 200 and events.headers["x-replica"] == jobs[last]
            names = [line.removeprefix("event: ") for line in events.iter_lines()
                     if line.startswith("event: ")]
        assert names[-1] == "succeeded" and "step" in names
        for job_id, owner in jobs.items():
            wait_until(lambda job_id=job_id: job_finished(client, job_id), ANSWER_TIMEOUT, f"job {job_id}")
            for _ in range(3):  # never a replica that does not know the job
                status = client.get(f"/v1/jobs/{job_id}")
                assert status.status_code == 200 and status.headers["x-replica"] == owner
                assert status.json()["status"] == "succeeded"
            image = client.get(f"/v1/jobs/{job_id}/image")
            assert image.status_code == 200 and image.content.startswith(PNG)
            assert image.headers["x-replica"] == owner
        cancel = client.delete(f"/v1/jobs/{last}")
        assert cancel.status_code == 200 and cancel.json()["status"] == "succeeded"

        generated = client.post("/v1/images/generations", json={
            "prompt": "a fox", "size": "256x256", "response_format": "url", "num_inference_steps": 2})
        assert generated.status_code == 200
        url = generated.json()["data"][0]["url"]
        for _ in range(3):
            image = client.get(url)
            assert image.status_code == 200 and image.content.startswith(PNG)
            assert image.headers["x-replica"] == generated.headers["x-replica"]
        # An id whose replica is gone (or never was) is unknown, like an expired one.
        assert client.get("/v1/jobs/gone0000.0123abcd").status_code == 404


def test_the_openai_client_streams_through_ray(deployment: Deployment) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{deployment.url}/v1", api_key="unused", timeout=ANSWER_TIMEOUT)
    events = list(client.images.generate(
        model="tiny", prompt="a fox", size="256x256", n=2, stream=True,
        extra_body={"num_inference_steps": 2, "seed": 3}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert all(base64.b64decode(e.b64_json).startswith(PNG) for e in events)


def test_a_full_replica_queue_answers_429_with_retry_after(deployment: Deployment) -> None:
    # Jobs do not hold a request open, so Ray lets them all through; each replica's scheduler
    # takes MAX_QUEUE waiting jobs and one running, and refuses the rest itself.
    with deployment.client() as client:
        answers = [client.post("/v1/jobs", json=body)
                   for body in seeds(REPLICAS * (MAX_QUEUE + 1) + 4)]
        assert {r.status_code for r in answers} == {202, 429}
        for refused in (r for r in answers if r.status_code == 429):
            assert refused.json()["error"]["type"] == "queue_full"
            assert int(refused.headers["retry-after"]) >= 1
        accepted = [r.json()["id"] for r in answers if r.status_code == 202]
        for job_id in accepted:  # reaches the owner, or it would be 404
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
        for job_id in accepted:
            wait_until(lambda job_id=job_id: job_finished(client, job_id), ANSWER_TIMEOUT, f"job {job_id} to end")


def test_a_full_proxy_queue_answers_429_with_retry_after(deployment: Deployment) -> None:
    # Far past what the replicas (MAX_ONGOING each) and the proxy (MAX_QUEUED) hold at once.
    held = REPLICAS * MAX_ONGOING + MAX_QUEUED
    bodies = seeds(3 * held)
    cancelled_before = sum(info["scheduler"]["cancelled"] for info in replica_infos(deployment).values())

    async def send_until_first_image() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=deployment.url, timeout=ANSWER_TIMEOUT) as client:
            pending = {asyncio.ensure_future(client.post("/generate", json=body)) for body in bodies}
            answered: list[httpx.Response] = []
            while pending and not any(r.status_code == 200 for r in answered):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answered += [task.result() for task in done]
            # Refusals come at once (a request the proxy queued waits for a replica), so they
            # are all in. The other clients go away now: Ray cancels their requests and the
            # replicas their jobs.
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            return answered

    answered = asyncio.run(send_until_first_image())
    refused = [r for r in answered if r.status_code == 429]
    # Ray counts its queue approximately; even at twice the nominal room, these are refused.
    assert len(refused) >= len(bodies) - 2 * held
    assert {r.status_code for r in answered} == {200, 429}
    assert all(r.headers["retry-after"] == str(RETRY_AFTER_S) for r in refused)
    assert "backpressure" in refused[0].text

    infos = wait_idle(deployment)
    assert sum(info["scheduler"]["cancelled"] for info in infos.values()) > cancelled_before


def test_a_replica_reads_its_keys_from_its_own_environment(deployment: Deployment, tmp_path: Path) -> None:
    # The application built without keys (its builder's environment has none); the replica's node
    # has them (Ray's runtime_env sets a replica's environment, as `ray start` under a
    # Kubernetes Secret would).
    settings = tiny_settings(tmp_path, threads=1, max_batch_size=1, ray_replicas=1)
    options = deployment_options(settings, cluster_gpus=0)
    options["ray_actor_options"] = {**options["ray_actor_options"],
                                    "runtime_env": {"env_vars": {"QWEN_IMAGE_API_KEYS": API_KEY}}}
    keyed = QwenImageDeployment.options(**options).bind(*build_app(settings)._bound_deployment.init_args)
    try:
        serve.run(keyed, name="keyed", route_prefix="/keyed")
        with deployment.client() as client:
            refused = client.get("/keyed/info")
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["type"] == "authentication_error"
            assert client.get("/keyed/info", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
            assert client.get("/keyed/health").status_code == 200
    finally:
        serve.delete("keyed")


def test_a_model_that_cannot_load_fails_the_deployment_with_its_reason(
    deployment: Deployment, tmp_path: Path
) -> None:
    settings = tiny_settings(tmp_path, model=str(tmp_path / "no-such-model"), ray_replicas=1)
    broken = QwenImageDeployment.options(
        **deployment_options(settings, cluster_gpus=0), max_constructor_retry_count=1,
    ).bind(replica_settings(settings))
    try:
        with pytest.raises(RuntimeError):
            serve.run(broken, name="broken", route_prefix="/broken")
        reason = deploy_failure("broken")
        assert reason.startswith(f"Could not load the model '{settings.model}'")
        assert "does not exist" in reason and "Traceback" not in reason
    finally:
        serve.delete("broken")


def test_killing_a_replica_mid_load_leaves_no_request_unanswered(deployment: Deployment) -> None:
    before = deployment.replica_names()
    # As many as the proxy may queue: none is refused, some wait in the proxy at the kill.
    bodies = seeds(MAX_QUEUED)
    answers: list[httpx.Response | BaseException] = []
    first_image = threading.Event()

    async def send_all() -> None:
        async with httpx.AsyncClient(base_url=deployment.url, timeout=ANSWER_TIMEOUT) as client:
            async def send(body: dict) -> None:
                try:
                    answer = await client.post("/generate", json=body)
                except httpx.HTTPError as exc:  # no answer at all: what must not happen
                    answers.append(exc)
                    return
                answers.append(answer)
                if answer.status_code == 200:
                    first_image.set()

            await asyncio.gather(*(send(body) for body in bodies))

    sender = threading.Thread(target=asyncio.run, args=(send_all(),))
    sender.start()
    assert first_image.wait(ANSWER_TIMEOUT), "no image at all"
    # The load is flowing: every replica holds requests and more wait in the proxy.
    victim = next(a.headers["x-replica"] for a in answers
                  if isinstance(a, httpx.Response) and a.status_code == 200)
    pending_at_kill = len(bodies) - len(answers)
    ray.kill(ray.get_actor(replica_actors()[victim], namespace="serve"), no_restart=True)
    assert pending_at_kill > 0, "every request was answered before the kill: nothing was at stake"
    sender.join(ANSWER_TIMEOUT + 30)
    assert not sender.is_alive(), "a request was never answered"

    assert len(answers) == len(bodies)
    assert not [a for a in answers if isinstance(a, BaseException)]
    failed = [a for a in answers if a.status_code != 200]
    assert all(a.status_code >= 500 for a in failed)
    # Only what the killed replica itself had taken is lost; Ray retried the rest elsewhere.
    assert len(failed) <= MAX_ONGOING
    assert all(a.content.startswith(PNG) for a in answers if a.status_code == 200)

    # Ray replaces the replica; the new one serves under a new name.
    wait_until(lambda: running_replicas() == REPLICAS and len(set(replica_actors()) - before) == 1,
               ANSWER_TIMEOUT, "a replacement replica", interval=0.5)
