"""The Dockerfile's promises that need no build (fast, in the main suite); test_image.py builds it."""

from __future__ import annotations

import re

import tomllib

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_the_default_base_carries_the_torch_that_requirements_pin():
    # The base's torch satisfies the pin, so a CUDA build downloads no second torch.
    [base] = re.findall(r"^ARG BASE=(\S+)$", DOCKERFILE, re.MULTILINE)
    pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pin is not None
    assert base.startswith(f"pytorch/pytorch:{pin.group(1)}-cuda") and base.endswith("-runtime"), base


def test_every_extra_of_the_package_can_be_built_in_from_a_pinned_file():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for extra in extras - {"test", "modelscope"}:
        lines = (ROOT / f"requirements-{extra}.txt").read_text().splitlines()
        pins = [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]
        assert pins and all("==" in pin for pin in pins), f"requirements-{extra}.txt pins {pins}"


def test_the_build_context_admits_everything_the_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE, re.MULTILINE):
        copied |= set(sources.split())
    assert copied == {"requirements*.txt", "pyproject.toml", "README.md", "qwen_image_server"}
    assert copied <= admitted
