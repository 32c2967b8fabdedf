"""The documentation: the README is a front page whose links lead somewhere, the docs site builds
with `mkdocs build --strict` (no broken link or anchor), its configuration page lists every
setting with a flag the CLI really has, its API reference every route of the app, and the docs
name no setting the server does not have.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MKDOCS = Path(sys.executable).parent / "mkdocs"

pytestmark = pytest.mark.xdist_group("docs")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def page_text(site: Path, name: str) -> str:
    html = (site / name / "index.html").read_text()
    return re.sub(r"<[^>]+>", "", html)


def test_the_readme_is_a_front_page_with_both_commands_and_working_links():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "bash start_server.sh      # start the server on http://localhost:5000 (embedded tiny model)" in text
    assert "bash run_tests.sh         # run the whole test suite" in text
    assert "QWEN_IMAGE_MODEL=Qwen/Qwen-Image bash start_server.sh" in text
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local, "the README links to the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    # Every page of the site is reachable from the front page's feature list.
    pages = {path.name for path in DOCS.glob("*.md")} - {"index.md"}
    linked = {Path(link).name for link in local}
    assert pages <= linked, sorted(pages - linked)


def test_the_docs_site_builds_strictly_and_lists_every_setting(site):
    from qwen_image_server.config.settings import Settings

    text = page_text(site, "configuration")
    golden_flags = set(json.loads((ROOT / "tests" / "golden" / "cli-options.json").read_text())["serve"])
    for name in Settings.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in text, f"{name} is not on the configuration page"
        assert flag in golden_flags, f"the configuration page names {flag}, which `qwen-image serve` lacks"
        assert f"QWEN_IMAGE_{name.upper()}" in text or name in ("host", "port", "workers", "threads")


def test_the_api_reference_lists_every_route_and_ships_the_openapi_document(site):
    document = json.loads((site / "openapi.json").read_text())
    text = page_text(site, "api-reference")
    routes = [(method.upper(), path) for path, methods in document["paths"].items() for method in methods]
    assert len(routes) >= 15
    for method, path in routes:
        assert f"{method} {path}" in text, f"{method} {path} is not in the API reference"
    assert "/generate" in document["paths"] and "/v1/images/generations" in document["paths"]


def test_the_docs_name_only_settings_the_server_has():
    from qwen_image_server.config.settings import Settings

    known = {f"QWEN_IMAGE_{name.upper()}" for name in Settings.model_fields}
    # Not server settings, and documented as such: the image's build argument and the CI switch
    # that runs the container test.
    known |= {"QWEN_IMAGE_EXTRAS", "QWEN_IMAGE_CONTAINER_TEST"}
    texts = [README.read_text()] + [page.read_text() for page in DOCS.glob("*.md")]
    named = {match for text in texts for match in re.findall(r"QWEN_IMAGE_[A-Z0-9_]*[A-Z0-9]\b(?!\*)", text)}
    unknown = sorted(named - known)
    assert not unknown, f"the docs name settings the server does not have: {unknown}"
