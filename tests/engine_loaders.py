"""Loaders for engine processes in tests: the real tiny model, wrapped so a test can hold a batch
or a LoRA load inside the engine process, make a prompt crash its process, or make a prompt send
the front a message it cannot read.

A loader runs in the engine process, so it is a picklable object (a module-level class), and the
test talks to it through files: while `gate` exists every denoising step waits (when the gate
names process ids, only those engines' steps wait), and the engine writes `gate.held-<pid>` when
a step is waiting (the batch is provably running in that process); `lora_gate` does the same for
LoRA loads.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.types import GenerationSpec, StepEvent

CRASH = "crash the engine"  # a prompt starting with this kills its engine process at its first step
# A prompt starting with this sends, at its first step, a step event the front cannot unpickle (as
# from another version of the code), then carries on with its batch.
GARBLE = "garble the pipe"
HOLD_LIMIT_S = 120.0


def _unreadable() -> None:
    raise ImportError("this message comes from another version of the server")


class Unreadable:
    """Pickles in the engine process; unpickling it raises, in the front."""

    def __reduce__(self):
        return (_unreadable, ())


class GatedEngine:
    def __init__(self, engine, gate: Path) -> None:
        self.engine = engine
        self.gate = gate

    def __getattr__(self, name: str):
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def run_batch(self, specs: Sequence[GenerationSpec], on_step):
        def step(event: StepEvent) -> None:
            if any(spec.prompt.startswith(CRASH) for spec in specs):
                os.kill(os.getpid(), signal.SIGKILL)  # as a segfault or the OOM killer would
            if event.step == 1 and any(spec.prompt.startswith(GARBLE) for spec in specs):
                on_step(StepEvent(event.step, event.total, {0: Unreadable()}))  # type: ignore[dict-item]
            _wait_at(self.gate)
            on_step(event)

        return self.engine.run_batch(specs, step)


def _closed_for_me(gate: Path) -> bool:
    """The gate exists and holds every engine (empty) or names this one's process id."""
    try:
        named = gate.read_text().split()
    except FileNotFoundError:
        return False
    return not named or str(os.getpid()) in named


def _wait_at(gate: Path) -> None:
    """Wait while `gate` is closed for this engine, saying so in `gate.held-<pid>`."""
    held = gate.with_name(f"{gate.name}.held-{os.getpid()}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while _closed_for_me(gate) and time.monotonic() < deadline:
        held.touch()
        time.sleep(0.01)  # another process opens the gate: nothing to wait on but the file
    held.unlink(missing_ok=True)


@dataclass(frozen=True)
class GatedLoader:
    gate: Path
    lora_gate: Path | None = None  # while it exists, every LoRA load waits before it starts

    def __call__(self, settings: Settings):
        from qwen_image_server.engine.models import load_engine

        if self.lora_gate is not None:
            from qwen_image_server.engine.adapters import ResidentAdapters

            load, gate = ResidentAdapters._load, self.lora_gate

            def held_load(adapters, name, path):
                _wait_at(gate)
                return load(adapters, name, path)

            ResidentAdapters._load = held_load  # this engine process's own class
        return GatedEngine(load_engine(settings), self.gate)


@dataclass(frozen=True)
class PinReport:
    """A fake engine that first writes `folder/rank-<pid>`: the CUDA_VISIBLE_DEVICES its process got."""

    folder: Path

    def __call__(self, settings: Settings):
        from tests.fakes import FakeEngine

        (self.folder / f"rank-{os.getpid()}").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        return FakeEngine()


def count_block_passes(rank: int, world: int, mode: str, address: str, out: Path) -> None:
    """One rank of an engine split `mode`-wise (torch.multiprocessing.spawn's target): generate one
    image with CFG, 2 steps, and write how often this rank ran the transformer's first block."""
    from qwen_image_server.engine.messages import RankPlan
    from qwen_image_server.engine.models import load_engine
    from qwen_image_server.engine.parallel import RankGroup

    group = RankGroup(RankPlan(rank, world, mode, address))  # type: ignore[arg-type]
    engine = load_engine(Settings(_env_file=None, model="tiny", log_level="warning"))
    group.parallelize(engine.engines.values())
    passes: list[int] = []
    engine.first.pipeline.transformer.transformer_blocks[0].register_forward_hook(lambda *args: passes.append(1))
    spec = GenerationSpec(prompt="a cat", negative_prompt=" ", width=64, height=64, num_inference_steps=2,
                          true_cfg_scale=4.0, seed=1)
    engine.run_batch([spec], lambda event: None)
    (out / f"rank-{rank}").write_text(str(len(passes)))
    group.close()


@dataclass(frozen=True)
class SmallLayersLoader:
    """The real engine, with QwenImageLayeredPipeline sizing its layers for a `side` x `side`
    bucket whatever the request's resolution (the front's `specs.layered_size` is shrunk the same
    way by the test): the layered model's path, at a test's size."""

    side: int = 128

    def __call__(self, settings: Settings):
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as pipeline_module

        from qwen_image_server.engine.process import load_server_engine

        real, side = pipeline_module.calculate_dimensions, self.side
        pipeline_module.calculate_dimensions = lambda area, ratio: real(side * side, ratio)
        return load_server_engine(settings)
