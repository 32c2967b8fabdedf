"""The monitoring that ships with compose.yaml: Prometheus' configuration and alert rules, checked
and unit-tested with promtool, and the Grafana dashboard, every query of which must parse and
name only metrics (and labels) that a running server really exports.

promtool comes from Debian's `prometheus` package (.ci/run installs it). Without it these tests
fail; QWEN_IMAGE_ALLOW_NO_PROMTOOL=1 turns that into a skip on a machine that cannot have it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "qwen-image-server.json"
RULES = PROMETHEUS / "rules" / "qwen-image-alerts.yml"
# Grafana's own variables, as Grafana fills them in before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h"}
# Series Prometheus makes itself (not the server).
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan", "atan2"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("QWEN_IMAGE_ALLOW_NO_PROMTOOL") == "1":
            pytest.skip("promtool is not installed (QWEN_IMAGE_ALLOW_NO_PROMTOOL=1)")
        pytest.fail("promtool is not installed: apt-get install prometheus (or set "
                    "QWEN_IMAGE_ALLOW_NO_PROMTOOL=1 to skip these tests)")
    return path


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def alert_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def names_in(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: no names in them
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    metrics = {name for name, call in re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", bare)
               if not call and name.lower() not in PROMQL_WORDS}
    return metrics, labels


@pytest.fixture(scope="module")
def exported(tiny_server) -> dict[str, set[str]]:
    """Every series name the tiny server's /metrics has, with its label names, after one image
    (histograms with labels have series only once observed)."""
    body = {"prompt": "a lighthouse", "num_inference_steps": 2, "add_overlay": False}
    assert httpx.post(f"{tiny_server.url}/generate", json=body, timeout=120).status_code == 200
    text = httpx.get(f"{tiny_server.url}/metrics", timeout=30).text
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check_parses(promtool: str, tmp_path: Path, queries: list[tuple[str, str]]) -> None:
    """Each query as a recording rule: `promtool check rules` parses them all."""
    rules = {"groups": [{"name": "queries", "rules": [
        {"record": f"query:{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]}]}
    file = tmp_path / "queries.yml"
    file.write_text(yaml.safe_dump(rules))
    run(promtool, "check", "rules", str(file))


def unknown_names(queries: list[tuple[str, str]], exported: dict[str, set[str]]) -> list[str]:
    problems = []
    for title, expr in queries:
        metrics, labels = names_in(expr)
        assert metrics, f"{title}: no metric found in {expr}"
        for metric in sorted(metrics - PROMETHEUS_SERIES):
            if metric not in exported:
                problems.append(f"{title}: {metric} is not exported")
        known = set().union(*(exported.get(m, set()) for m in metrics)) | {"job", "instance"}
        problems += [f"{title}: no label {label} on {sorted(metrics)}" for label in sorted(labels - known)]
    return problems


def test_every_dashboard_query_parses(promtool, tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 20
    check_parses(promtool, tmp_path, queries)


def test_every_dashboard_query_names_metrics_and_labels_the_server_exports(exported):
    assert unknown_names(dashboard_queries(), exported) == []


def test_the_dashboard_shows_queue_throughput_latency_engines_errors_previews_and_loras():
    metrics = set().union(*(names_in(expr)[0] for _, expr in dashboard_queries()))
    for wanted in ("qwen_image_queue_size", "qwen_image_queue_wait_seconds_bucket",
                   "qwen_image_images_generated_total", "qwen_image_job_duration_seconds_bucket",
                   "qwen_image_engine_busy", "qwen_image_engine_up", "qwen_image_engine_restarts_total",
                   "qwen_image_gpu_memory_allocated_bytes", "qwen_image_jobs_rejected_total",
                   "qwen_image_jobs_failed_total", "qwen_image_http_requests_total",
                   "qwen_image_preview_seconds_count", "qwen_image_lora_switches_total"):
        assert wanted in metrics, f"no panel shows {wanted}"
    # Every panel reads the data source that provisioning creates.
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {uid}


def test_the_name_extraction_sees_through_functions_matchers_and_grouping():
    # The check above is only as good as this: a misspelt metric or label must show up.
    metrics, labels = names_in('histogram_quantile(0.95, sum by (le, route) (rate('
                               'qwen_image_http_request_duration_secs_bucket{status=~"5..", job="x"}[5m])))')
    assert metrics == {"qwen_image_http_request_duration_secs_bucket"}
    assert labels == {"le", "route", "status", "job"}


def test_alert_rules_pass_promtool_and_name_exported_metrics(promtool, exported):
    assert "SUCCESS: 6 rules found" in run(promtool, "check", "rules", str(RULES))
    assert {name for name, _ in alert_queries()} == {
        "QwenImageDown", "QwenImageQueueFull", "QwenImageEngineDown", "QwenImageErrorRate",
        "QwenImageHttpErrors", "QwenImageSlowImages"}
    assert unknown_names(alert_queries(), exported) == []


def test_alert_rules_fire_as_their_unit_tests_expect(promtool):
    out = run(promtool, "test", "rules", str(PROMETHEUS / "tests" / "qwen-image-alerts.test.yml"))
    assert "SUCCESS" in out


def test_prometheus_config_is_valid_and_scrapes_the_compose_server(promtool, tmp_path):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    [scrape] = config["scrape_configs"]
    [target] = scrape["static_configs"][0]["targets"]
    host, port = target.split(":")
    server = compose["services"][host]
    assert server["ports"] == [f"{port}:{port}"]
    assert scrape["metrics_path"] == "/metrics"
    # The key Prometheus sends is the server's QWEN_IMAGE_METRICS_KEY, through a compose secret.
    secret = Path(scrape["authorization"]["credentials_file"]).name
    assert compose["secrets"][secret]["environment"] == "QWEN_IMAGE_METRICS_KEY"
    assert "QWEN_IMAGE_METRICS_KEY" in server["environment"]
    assert secret in compose["services"]["prometheus"]["secrets"]
    # promtool checks the file as Prometheus would load it: the key file and rules beside it.
    (tmp_path / "rules").symlink_to(PROMETHEUS / "rules")
    key = tmp_path / "metrics_key"
    key.write_text("test-key\n")
    scrape["authorization"]["credentials_file"] = str(key)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    out = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out


def test_compose_mounts_files_that_exist_and_grafana_reads_the_compose_prometheus():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    url = httpx.URL(datasource["datasources"][0]["url"])
    assert url.host in compose["services"] and f"{url.port}:{url.port}" in compose["services"][url.host]["ports"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "qwen-image.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]
