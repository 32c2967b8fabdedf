"""An engine in its own process: one model copy, pinned to one GPU, fed by the front over a pipe.

The front (HTTP, validation, the queue, every job's state) talks to `EngineProcess`, which is an
`Engine` like the in-process one: `run_batch(specs, on_step)` and `free_memory()`. Underneath, a
child process pins itself to its GPU with CUDA_VISIBLE_DEVICES, loads the models with the same
loader as the in-process engine, and serves batches. It is forked from a fork server that
imported the model libraries once (`engine/preload.py`), so an engine (a restart, the second of
WORKERS) starts in the time of its model load; nothing of the front is copied (no threads, no
CUDA state), and the fork server never starts CUDA. Where there is no fork server (Windows) each
engine is a fresh interpreter ("spawn"). The messages that cross
the pipe are the small types of `engine/messages.py`: specs out, step events, images and errors
back. A cancel (the front's step callback raising) sends `Abort`: the engine stops at its next
step.

The engine's LoRA library state (`LoraState`: the models' layers, what is resident, unusable or
loading) comes with `Ready` and as `LorasChanged` whenever it changes (a load starts or ends,
a LoRA is marked unusable, the resident set changes), checked again after each batch. The front
imports it into one `LoraLibrary` shared by all its engines (`EngineProcess.loras`), so LoRAs are
checked before queueing, listed and reported in job statuses as with the in-process engine.

The front notices a dead engine at once: every wait also watches the process's sentinel
(`EngineLost`), and `on_exit` watches it while the engine is idle. An engine notices a dead front
the same way: its end of the pipe reads end-of-file, and it exits, even mid-batch (after a
kill -9 of the front too). An engine that sends what the front cannot read or does not expect (an
answer to another command; a message of another version of the code) is killed, and lost as a
dead one is: it may still be running a batch whose answers could never be placed. So is one
whose batch hangs past its deadline (the scheduler's watchdog calls `kill`). Engines ignore
SIGINT and SIGTERM: a Ctrl+C or a SIGTERM to the whole process group reaches the front, which
drains and then stops its engines.

An engine of several GPUs (QWEN_IMAGE_GPUS_PER_ENGINE=K) is K processes: rank 0 runs `engine_main`
and talks to the front; ranks 1..K-1 run `follower_main`, each pinned to its own GPU, and do what
rank 0 shares with them (engine/parallel.py). The front watches every rank: one that dies ends
the engine (the others are killed) and it is lost as a one-GPU engine is. A batch that fails on
any rank ends the engine too, since the others may be waiting for it mid-step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from qwen_image_server import errors
from qwen_image_server.config.checks import resolve_mode
from qwen_image_server.config.settings import Settings
from qwen_image_server.engine.contract import EngineFacts, RankFacts, facts_of
from qwen_image_server.engine.lora_library import LoraLibrary, LoraState
from qwen_image_server.engine.messages import (
    Abort,
    Aborted,
    Done,
    Failed,
    Failure,
    FailureKind,
    Free,
    Freed,
    FromEngine,
    LoadFailed,
    LorasChanged,
    RankPlan,
    Ready,
    Run,
    Step,
    Stop,
    ToEngine,
    describe,
)
from qwen_image_server.engine.types import (
    BatchAborted,
    DeviceFailure,
    DeviceOutOfMemory,
    EngineLost,
    GenerationSpec,
    StepCallback,
    StepEvent,
)

if TYPE_CHECKING:
    from PIL import Image

    from qwen_image_server.engine.contract import Engine
    from qwen_image_server.engine.loaded import LoadedModel
    from qwen_image_server.engine.parallel import RankGroup
    from qwen_image_server.engine.prompt_cache import PromptCacheStats

log = logging.getLogger(__name__)

# A loader runs in the engine process: settings -> an engine (picklable: a module-level function).
Loader = Callable[[Settings], "Engine"]
PRELOAD = "qwen_image_server.engine.preload"


def _engine_context() -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([PRELOAD])
    return context


_CONTEXT = _engine_context()
_ANSWERS = (Step, Done, Aborted, Failed, Freed)  # what answers a numbered command
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class PipelineFacts:
    """What the front needs of a pipeline it does not hold: its class and its tokenizer (prompt
    lengths are checked in the front, before a job is queued).

    The tokenizer crosses as its Rust `tokenizers.Tokenizer` when it has one (all the front
    counts with, see serving/prompt_tokens.py), so the front need not import transformers to read it.
    """

    class_name: str
    tokenizer: Any
    tokenizer_max_length: int


def _facts(model: LoadedModel) -> LoadedModel:
    pipeline = model.pipeline
    tokenizer = getattr(pipeline, "tokenizer", None)
    return replace(model, controlnet=None, inpaint_controlnet=None, pipeline=PipelineFacts(
        type(pipeline).__name__, getattr(tokenizer, "backend_tokenizer", tokenizer),
        int(getattr(pipeline, "tokenizer_max_length", 1024))))


def cuda_started() -> bool:
    """This process (or the one it was forked from) has started CUDA: torch is imported and says so."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def _memory() -> dict[str, float] | None:
    from qwen_image_server.engine.device import gpu_memory_mb, resolve_device

    try:
        return gpu_memory_mb(resolve_device("auto"))
    except Exception:  # noqa: BLE001 - numbers for /info, never a reason to fail a batch
        return None


def pinned_device(gpu: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for the engine on the front's `gpu`-th visible GPU: the front may
    itself see only some GPUs (CUDA_VISIBLE_DEVICES=2,3 or GPU UUIDs), counted from 0."""
    devices = [d.strip() for d in (visible or "").split(",") if d.strip()]
    return devices[gpu] if gpu < len(devices) else str(gpu)


# -- the engine process ------------------------------------------------------------------------

def _start_process(conn: Connection, settings: Settings, gpu: int | None) -> None:
    """What every engine process (every rank) does first: pin its GPU, ignore the signals the
    front handles, log as the front does."""
    if cuda_started():
        # Forked after CUDA started: this process can neither use that context nor pin its GPU.
        conn.send(LoadFailed(Failure(FailureKind.LOAD, "CUDA was started before this engine process could "
                                     "pin its GPU; the server cannot give each engine its own GPU.")))
        _exit()
    if gpu is not None:  # before anything touches CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = pinned_device(gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from qwen_image_server.config.logs import configure_logging

    configure_logging(settings.log_level)


def _join_ranks(plan: RankPlan | None, settings: Settings, loader: Loader) -> tuple[Engine, RankGroup | None]:
    """Load the engine; on a rank of several, join the others first and split its models after."""
    if plan is None:
        return loader(settings), None
    from qwen_image_server.engine.parallel import RankGroup

    group = RankGroup(plan)
    engine = loader(settings)
    runners = getattr(engine, "engines", None)  # the models' runners (a test's fake engine has none)
    if runners is not None:
        group.parallelize(runners.values())
    group.barrier()  # every rank loaded (one that failed has exited: this raises)
    return engine, group


def follower_main(conn: Connection, settings: Settings, gpu: int | None, loader: Loader, plan: RankPlan) -> None:
    """A rank other than 0 of an engine of several GPUs: run every command rank 0 shares, in step
    with it, until `Stop`, until the front is gone, or until anything fails (then it exits, and
    the front restarts the whole engine: the other ranks may be waiting on it mid-step)."""
    _start_process(conn, settings, gpu)

    def watch_front() -> None:
        with contextlib.suppress(EOFError, OSError):
            conn.recv()  # the front sends nothing: this returns when it is gone
        os._exit(0)

    threading.Thread(target=watch_front, name="qwen-image-rank-pipe", daemon=True).start()
    try:
        engine, group = _join_ranks(plan, settings, loader)
    except BaseException as exc:  # told to the front, which reports it rather than a rank that exited
        if not isinstance(exc, errors.ModelLoadError):
            log.exception("rank %d failed to load", plan.rank)
        conn.send(LoadFailed(Failure.of(exc)))
        _exit()
    assert group is not None

    def on_step(event: StepEvent) -> None:
        if group.agree_stop(False):
            raise BatchAborted

    try:
        while True:
            command = group.share()
            if isinstance(command, Stop):
                _exit()
            if isinstance(command, Free):
                engine.free_memory()
                continue
            assert isinstance(command, Run)
            try:
                engine.run_batch(command.specs, on_step)
            except BatchAborted:
                continue
    except BaseException:
        log.exception("rank %d of engine stopped", plan.rank)
        _exit()


def engine_main(conn: Connection, settings: Settings, gpu: int | None, loader: Loader,
                plan: RankPlan | None = None) -> None:
    """The engine process (rank 0 of an engine of several GPUs): pin the GPU, load, then serve the
    front's commands until `Stop` or until the front is gone."""
    _start_process(conn, settings, gpu)
    commands: queue.Queue[ToEngine] = queue.Queue()
    abort = threading.Event()

    def read() -> None:
        while True:
            try:
                command: ToEngine = conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the front is gone: nobody is left to take this engine's images
            if isinstance(command, Abort):
                abort.set()
            else:
                commands.put(command)

    threading.Thread(target=read, name="qwen-image-engine-pipe", daemon=True).start()
    try:
        engine, group = _join_ranks(plan, settings, loader)
        facts = facts_of(engine)  # an engine without models (a test's fake) has none to tell
        models = [_facts(model) for model in facts.models]
    except BaseException as exc:  # reported to the front, which decides
        if not isinstance(exc, errors.ModelLoadError):
            log.exception("engine failed to load")
        conn.send(LoadFailed(Failure.of(exc)))
        _exit()
    library = facts.loras
    sent: LoraState | None = library.export_state() if library is not None else None
    conn.send(Ready(models, _memory(), sent))

    def send_loras() -> None:
        # Called on the engine thread only (the batch's), as every send is.
        nonlocal sent
        state = library.export_state() if library is not None else None
        if state is not None and state is not sent:  # states are immutable: a new one is a change
            sent = state
            conn.send(LorasChanged(state))

    if library is not None:
        library.on_change = send_loras

    number = 0  # of the batch running

    def on_step(event: StepEvent) -> None:
        conn.send(Step(number, event))
        stop = abort.is_set()
        if group is not None:  # every rank stops at this same step, or none does
            stop = group.agree_stop(stop)
        if stop:
            raise BatchAborted

    while True:
        command = commands.get()
        if group is not None:
            group.share(command)  # the other ranks run it too
        if isinstance(command, Stop):
            _exit()
        if isinstance(command, Free):
            engine.free_memory()
            conn.send(Freed(command.number))
            continue
        assert isinstance(command, Run)
        number = command.number
        abort.clear()
        try:
            images = engine.run_batch(command.specs, on_step)
        except BatchAborted:
            send_loras()
            conn.send(Aborted(number))
            continue
        except BaseException as exc:  # every failure goes back to the front
            if group is not None:
                # The other ranks may be waiting on this one mid-step, or have failed themselves:
                # the engine ends, and the front restarts it and retries the batch once.
                log.exception("batch failed on rank 0; the engine of %d ranks stops", plan.world if plan else 1)
                _exit()
            if not isinstance(exc, (DeviceOutOfMemory, DeviceFailure, errors.ServerError)):
                log.exception("batch failed in the engine process")
            send_loras()  # before the error: the front's next check sees an unusable mark
            conn.send(Failed(number, Failure.of(exc)))
            if isinstance(exc, DeviceFailure):
                _exit()  # the device is unusable: the front starts a fresh process
            continue
        send_loras()
        conn.send(Done(number, images, _memory(), facts_of(engine).prompt_cache))


def _exit() -> None:
    # Everything was sent (a send returns once written); a plain interpreter exit could wait on
    # threads the libraries started.
    logging.shutdown()
    os._exit(0)


# -- the front's side --------------------------------------------------------------------------

class EngineProcess:
    """The front's handle on one engine process; an `Engine` to the scheduler."""

    def __init__(self, settings: Settings, index: int, gpu: int | None, loader: Loader,
                 loras: LoraLibrary | None = None, rank_gpus: Sequence[int | None] = ()) -> None:
        self.index = index
        self.gpu = gpu
        # An engine of several GPUs (QWEN_IMAGE_GPUS_PER_ENGINE): one process per rank, `gpu` rank 0's.
        self.rank_gpus = tuple(rank_gpus) or (gpu,)
        self.parallel = resolve_mode(settings.parallel, len(self.rank_gpus))
        self._memory: dict[str, float] | None = None  # as of the engine's last batch
        self._prompt_cache: PromptCacheStats | None = None  # as of the engine's last batch
        # The front's library (shared by the front's engines), fed by this engine's state.
        self._library = loras if loras is not None else LoraLibrary.from_settings(settings)
        self._has_loras = False  # the engine has a library (else it serves no LoRAs)
        self._lock = threading.Lock()  # one command at a time
        self._numbers = itertools.count(1)  # of the commands answered (Run, Free)
        plans: list[RankPlan | None] = [None]
        if self.parallel is not None:
            address = f"tcp://127.0.0.1:{_free_port()}"
            plans = [RankPlan(rank, len(self.rank_gpus), self.parallel, address)
                     for rank in range(len(self.rank_gpus))]
        self._conn, child = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(target=engine_main, args=(child, settings, gpu, loader, plans[0]),
                                         name=f"qwen-image-engine-{index}", daemon=True)
        self._process.start()
        child.close()  # only the engine holds its end: its death reads as end-of-file here
        # The other ranks: the front only watches them (their pipe tells them when the front is gone).
        self._followers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        for rank, plan in enumerate(plans[1:], start=1):
            mine, theirs = _CONTEXT.Pipe()
            process = _CONTEXT.Process(target=follower_main,
                                       args=(theirs, settings, self.rank_gpus[rank], loader, plan),
                                       name=f"qwen-image-engine-{index}-rank-{rank}", daemon=True)
            process.start()
            theirs.close()
            self._followers.append((process, mine))
        self._processes = [self._process] + [process for process, _ in self._followers]
        self.pid = self._process.pid
        try:
            message = self._receive()
            if isinstance(message, LoadFailed):
                raise message.failure.rebuild()
            if not isinstance(message, Ready):
                raise self._broken(f"sent {describe(message)} instead of Ready")
        except BaseException:
            self.close()  # a loaded engine must not hold its GPU for nobody
            raise
        self._models = tuple(message.models)
        self._memory = message.memory
        if message.loras is not None:
            self._library.import_state(index, message.loras)
            self._has_loras = True
        log.info("engine %d ready in process %s%s%s", index, self.pid,
                 f" on GPU {gpu}" if gpu is not None else "",
                 f" with {len(self.rank_gpus)} ranks ({self.parallel} parallel; processes "
                 f"{', '.join(str(p.pid) for p in self._processes)})" if self.parallel else "")

    @property
    def facts(self) -> EngineFacts:
        """Its models (as facts about their pipelines), the front's LoRA library fed by it, its
        GPU and process, the memory it reported last and the LoRAs it is loading now."""
        library = self._library if self._has_loras else None
        ranks = tuple(RankFacts(rank, gpu, process.pid) for rank, (gpu, process)
                      in enumerate(zip(self.rank_gpus, self._processes, strict=True))) if self.parallel else ()
        return EngineFacts(models=self._models, loras=library, gpu=self.gpu, pid=self.pid,
                           memory=self._memory, prompt_cache=self._prompt_cache,
                           ranks=ranks, parallel=self.parallel,
                           loading_loras=library.loading(self.index) if library is not None else {})

    # -- Engine -------------------------------------------------------------------------------

    def run_batch(self, specs: Sequence[GenerationSpec], on_step: StepCallback) -> list[Image.Image]:
        with self._lock:
            number = next(self._numbers)
            self._send(Run(number, list(specs)))
            failure: BaseException | None = None  # what the front's step callback raised
            while True:
                message = self._answer(number)
                if isinstance(message, Step):
                    if failure is None:
                        try:
                            on_step(message.event)
                        except BaseException as exc:  # noqa: BLE001 - a cancel, or a test's fault
                            failure = exc
                            self._send(Abort())
                    continue
                if isinstance(message, Done):
                    self._memory = message.memory
                    self._prompt_cache = message.prompt_cache
                    if failure is not None:
                        raise failure
                    return list(message.images)
                if isinstance(message, Aborted):
                    raise failure or BatchAborted()
                if isinstance(message, Failed):
                    if failure is not None:
                        raise failure
                    raise message.failure.rebuild()
                raise self._broken(f"sent {describe(message)} during batch #{number}")

    def free_memory(self) -> None:
        with self._lock:
            number = next(self._numbers)
            self._send(Free(number))
            message = self._answer(number)
            if not isinstance(message, Freed):
                raise self._broken(f"sent {describe(message)} instead of Freed #{number}")

    # -- supervision ---------------------------------------------------------------------------

    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call `callback` as soon as the engine process ends (on a watcher thread)."""

        def watch() -> None:
            wait([process.sentinel for process in self._processes])
            self._kill_all()  # one rank gone: the others cannot go on without it
            callback()

        threading.Thread(target=watch, name=f"qwen-image-engine-{self.index}-watch", daemon=True).start()

    def kill(self) -> None:
        """Kill the engine process now (its batch hung): a waiting `run_batch` raises EngineLost."""
        self._kill_all()

    def _kill_all(self) -> None:
        for process in self._processes:
            with contextlib.suppress(Exception):  # already gone
                process.kill()

    def close(self) -> None:
        """Ask the engine to stop; kill it if it does not within a few seconds."""
        self._library.forget_engine(self.index)
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(Stop())
        for process in self._processes:  # rank 0 tells the others to stop
            process.join(_STOP_TIMEOUT_S)
            if process.is_alive():
                log.warning("engine %d (process %s) did not stop; killing it", self.index, process.pid)
                process.kill()
                process.join(_STOP_TIMEOUT_S)
        self._conn.close()
        for _, conn in self._followers:
            conn.close()

    # -- the pipe ------------------------------------------------------------------------------

    def _send(self, message: ToEngine) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            raise self._lost() from exc

    def _answer(self, number: int) -> FromEngine:
        """The engine's next message, which must answer command `number`."""
        message = self._receive()
        if not isinstance(message, _ANSWERS) or message.number != number:
            raise self._broken(f"sent {describe(message)} while the front waited on command #{number}")
        return message

    def _receive(self) -> FromEngine:
        """The engine's next message; its LoRA states are imported on the way, wherever they come."""
        while True:
            message = self._receive_any()
            if not isinstance(message, LorasChanged):
                return message
            self._library.import_state(self.index, message.state)

    def _receive_any(self) -> FromEngine:
        # What the engine sent before it died is still read; only then is its death an error.
        # Any rank's end wakes this: rank 0 cannot finish without the others.
        ready = wait([self._conn, *(process.sentinel for process in self._processes)])
        if self._conn in ready or self._conn.poll():
            try:
                message: FromEngine = self._conn.recv()
            except (EOFError, OSError) as exc:
                raise self._lost() from exc
            except Exception as exc:  # it could not be unpickled: another version of the code, say
                raise self._broken(f"sent a message the front cannot read ({type(exc).__name__}: {exc})") from exc
            return message
        raise self._lost()

    def _broken(self, what: str) -> EngineLost:
        """The engine broke the protocol: it is killed, as it may still be running a batch whose
        answers no command could be matched with. Its batch fails as for any lost engine."""
        log.error("engine %d (process %s) %s; killing it", self.index, self.pid, what)
        self._library.forget_engine(self.index)
        self._kill_all()
        self._process.join(_STOP_TIMEOUT_S)
        return EngineLost(f"engine {self.index} (process {self.pid}) {what}; it was killed")

    def _lost(self) -> BaseException:
        """The error for an engine one of whose ranks is gone: what a rank said before it ended
        (it could not load), else EngineLost."""
        self._library.forget_engine(self.index)
        dead, said = next(((p, c) for p, c in self._followers if not p.is_alive()), (None, None))
        self._kill_all()  # the other ranks cannot go on without the one that is gone
        if dead is not None and said is not None:
            with contextlib.suppress(EOFError, OSError):
                if said.poll():
                    message = said.recv()
                    if isinstance(message, LoadFailed):
                        return message.failure.rebuild()
            dead.join(1.0)
            code = dead.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            return EngineLost(f"engine {self.index}: its rank in process {dead.pid} {how}")
        self._process.join(1.0)
        code = self._process.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}" if code is not None else "closed its pipe")
        return EngineLost(f"engine {self.index} (process {self.pid}) {how}")


def _free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def load_server_engine(settings: Settings) -> Engine:
    """The engines' default loader: the configured models. Imported in the engine process only,
    so that the front never imports diffusers or transformers (seconds of start-up, and memory)."""
    from qwen_image_server.engine.models import load_engine

    return load_engine(settings)


def engine_factories(settings: Settings, gpus: Sequence[int | None],
                     loader: Loader | None = None) -> list[Callable[[], Engine]]:
    """One factory per engine: engine i runs on gpus[i] (None: the CPU, or the one device)."""
    chosen: Loader = loader or load_server_engine
    loras = LoraLibrary.from_settings(settings)  # one for the front: every engine's state merged

    k = settings.gpus_per_engine

    def factory(index: int, ranks: Sequence[int | None]) -> Callable[[], Engine]:
        return lambda: EngineProcess(settings, index, ranks[0], chosen, loras, ranks)

    return [factory(i, gpus[i * k:(i + 1) * k]) for i in range(len(gpus) // k)]
