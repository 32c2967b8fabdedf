"""What clients script against, pinned: the OpenAPI document of every route and the options of
`qwen-image serve|generate|edit` must match the committed ones in tests/golden/.

Paths, methods, fields, types, defaults, limits and enums are compared; key order and the wording
of descriptions are not. A change to the API or the CLI then shows up here as a decision to make
(update the golden file with `python tests/test_public_surface.py --update`), never by accident
in a reorganisation.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
COMMANDS = ("serve", "generate", "edit", "layers")


def without_prose(doc: Any) -> Any:
    """The document without descriptions and summaries; lists of required names as sets."""
    if isinstance(doc, dict):
        return {key: (sorted(value) if key == "required" and isinstance(value, list) else without_prose(value))
                for key, value in doc.items()
                if not (key in ("description", "summary") and isinstance(value, str))}
    if isinstance(doc, list):
        return [without_prose(item) for item in doc]
    return doc


def differences(golden: Any, now: Any, where: str = "") -> list[str]:
    """Where two documents differ, as readable paths (at most the first 20)."""
    if isinstance(golden, dict) and isinstance(now, dict):
        out = [f"{where}/{key}: only in the golden file" for key in golden.keys() - now.keys()]
        out += [f"{where}/{key}: new" for key in now.keys() - golden.keys()]
        for key in golden.keys() & now.keys():
            out += differences(golden[key], now[key], f"{where}/{key}")
        return sorted(out)[:20]
    if golden != now:
        return [f"{where}: {json.dumps(golden)[:200]} -> {json.dumps(now)[:200]}"]
    return []


def openapi_now() -> dict[str, Any]:
    from qwen_image_server.api.app import create_app
    from qwen_image_server.config.settings import Settings
    from tests.fakes import FakeEngine

    settings = Settings(_env_file=None, model="tiny", output_dir=Path("tmp/public-surface"))
    return create_app(settings, engine_factory=FakeEngine).openapi()


def cli_options(command: str) -> list[str]:
    """The --options `qwen-image <command> --help` offers."""
    import contextlib
    import io

    from qwen_image_server.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue())) - {"--help"})


def test_the_openapi_document_is_the_committed_one():
    golden = json.loads((GOLDEN / "openapi.json").read_text())
    found = differences(without_prose(golden), without_prose(openapi_now()))
    assert not found, "the API changed:\n" + "\n".join(found)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_cli_offers_the_committed_options(command):
    golden = json.loads((GOLDEN / "cli-options.json").read_text())[command]
    now = cli_options(command)
    assert now == golden, {"gone": sorted(set(golden) - set(now)), "new": sorted(set(now) - set(golden))}


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    sys.path.insert(0, str(GOLDEN.parents[1]))
    (GOLDEN / "openapi.json").write_text(json.dumps(openapi_now(), indent=1, sort_keys=True) + "\n")
    (GOLDEN / "cli-options.json").write_text(
        json.dumps({c: cli_options(c) for c in COMMANDS}, indent=1, sort_keys=True) + "\n")
