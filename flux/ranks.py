"""Rank 0 of a server on several GPUs: the worker processes, each transformer call on every rank, and faults.

Rank 0 is the predictor process. At setup it starts one worker process per further GPU (flux.rank_worker), each
of which loads the transformer onto its own device and applies the same accelerations while rank 0 loads the
whole model; then all join one process group, put diffusers' context parallelism on their transformers
(flux.parallel) and compile and warm up together. While serving, only rank 0 runs the denoise loop: it is the
editor's velocity model (KontextEditor.velocity_model), so each transformer call of rank 0's step map becomes one
call on every rank. Rank 0 tells each worker over its control socket what the call's inputs are (flux.rank_wire),
broadcasts them, runs its own share and gathers the output. TaylorSeer's state stays on rank 0, and no rank can run
a step the map does not have: a worker computes only what rank 0 sends it. The request's LoRAs are fused on every
rank, and kept or taken out on every rank as on rank 0 (flux.rank_loras).

Faults never hang the server. A monitor thread watches the workers and the deadline of what is in progress (a
call, setup): a worker that exits, or a call not finished on every rank in time (FLUX_PARALLEL_TIMEOUT_S), ends the
workers, aborts the process group and records a fault naming the rank; the prediction fails with it
(errors.ParallelError), later ones fail at once with it until the server is restarted, and the health check
reports UNHEALTHY (predict.py's healthcheck). The calls run in a thread of their own: coglet cancels a prediction
by raising an exception in the prediction's thread, which must never land between two collectives; the
prediction's thread waits for the call in progress (every rank finishes it), then stops before the next step.
Workers end with rank 0: they exit when their control socket closes or their parent process is gone, and rank 0
ends them at exit.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import datetime
import itertools
import json
import logging
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from flux import parallel, sampling
from flux.errors import ParallelError
from flux.optimize import AccelerationConfig, CompileScope, Shape, warm_up
from flux.rank_loras import RankLoras
from flux.rank_wire import Worker, wire_specs

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
WORKER_MODULE = "flux.rank_worker"
MONITOR_INTERVAL_S = 0.05


def rank_compile_cache(cache: Path | None, settings: parallel.ParallelSettings, rank: int) -> Path | None:
    """Each rank keeps its own compile artifacts (its graphs hold its own collectives), apart from one GPU's."""
    return None if cache is None else Path(cache) / settings.describe() / f"rank-{rank}"


@dataclass(frozen=True)
class _Phase:
    """What rank 0 waits for, and until when: setup, a call, a LoRA."""

    what: str
    deadline: float  # time.monotonic()
    timeout_s: float
    finished: Callable[[Worker], bool]


# ---- rank 0 ------------------------------------------------------------------------------------------------


class Ranks:
    """Rank 0's side: start the workers, join them, then run every transformer call on all ranks (a callable with
    the transformer's keyword arguments that returns (output,), as the transformer does)."""

    def __init__(
        self,
        settings: parallel.ParallelSettings,
        weights: Path,
        device: torch.device,
        dtype: torch.dtype,
        accelerations: AccelerationConfig,
        compile_cache: Path | None,
    ):
        self.settings = settings
        self.weights = Path(weights)
        self.device = device
        self.dtype = dtype
        self.accelerations = accelerations
        self.compile_cache = compile_cache
        self.workers: list[Worker] = []
        self.fault: str | None = None
        self.transformer: torch.nn.Module | None = None
        self.context_parallel: parallel.ContextParallel | None = None
        self._lock = threading.Condition()
        self._phase: _Phase | None = None
        self._closed = False
        self._seq = itertools.count(1)
        self._calls = 0
        self._last_plan: parallel.SplitPlan | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rank0-calls")
        self._store: dist.TCPStore | None = None

    @classmethod
    def start(
        cls,
        settings: parallel.ParallelSettings,
        weights: str | Path,
        device: str | torch.device,
        accelerations: AccelerationConfig,
        compile_cache: Path | None,
    ) -> Ranks:
        """Check the setting against the model, then start the workers (they load while rank 0 does)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", 0)
        heads = json.loads((Path(weights) / "transformer" / "config.json").read_text())["num_attention_heads"]
        settings.check(heads, accelerations.attention, accelerations.compile is CompileScope.WHOLE)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if device.type == "cpu":  # CPU ranks (the tests) share the cores instead of each taking them all
            torch.set_num_threads(max(1, torch.get_num_threads() // settings.degree))
        ranks = cls(settings, Path(weights), device, dtype, accelerations, compile_cache)
        ranks._spawn_all()
        return ranks

    def rank_cache(self, rank: int) -> Path | None:
        return rank_compile_cache(self.compile_cache, self.settings, rank)

    # ---- setup ---------------------------------------------------------------------------------------------

    def _spawn_all(self) -> None:
        timeout = datetime.timedelta(seconds=self.settings.setup_timeout_s)
        self._store = dist.TCPStore("127.0.0.1", 0, self.settings.degree, True, timeout, wait_for_workers=False)
        self._set_phase("setup", self.settings.setup_timeout_s, lambda w: w.state == "ready")
        atexit.register(self.close)
        for rank in range(1, self.settings.degree):
            self.workers.append(self._spawn(rank))
        threading.Thread(target=self._monitor, name="rank0-monitor", daemon=True).start()
        logger.info(
            "context parallel %s: started %s",
            self.settings.describe(),
            ", ".join(w.describe() for w in self.workers),
        )

    def _spawn(self, rank: int) -> Worker:
        device = torch.device("cuda", rank) if self.device.type == "cuda" else self.device
        ours, theirs = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            *("--rank", str(rank), "--device", str(device), "--dtype", str(self.dtype).removeprefix("torch.")),
            *("--weights", str(self.weights), "--accelerations", self.accelerations.describe()),
            *("--compile-cache", str(self.rank_cache(rank) or "")),
            *("--settings", json.dumps(asdict(self.settings)), "--store-port", str(self._store.port)),
            *("--control-fd", str(theirs.fileno()), "--parent", str(os.getpid())),
            *("--threads", str(torch.get_num_threads())),
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        # The same process group as rank 0 (whatever stops the server's group stops the workers too).
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        worker = Worker(rank, device, proc, multiprocessing.connection.Connection(ours.detach()))
        worker.reader = threading.Thread(target=self._read, args=(worker,), name=f"rank{rank}-control", daemon=True)
        worker.reader.start()
        threading.Thread(target=self._relay, args=(worker,), name=f"rank{rank}-output", daemon=True).start()
        return worker

    def prepare(self, transformer: torch.nn.Module) -> None:
        """flux.optimize's `prepare` on rank 0 (after its own load, before compile): wait for the workers' load,
        join the process group with them, put context parallelism on the transformer. Every rank then compiles
        and warms up the same shapes, in the same order."""
        self._wait_until(lambda w: w.state in ("loaded", "ready"))
        for worker in self.workers:
            worker.send(("join",))
        if self.device.type == "cuda":
            # Rank 0 aborts its NCCL communicators itself on a fault (torch's own watchdog would end the process).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        parallel.join_group(0, self.settings, self._store, self.device)
        self.context_parallel = parallel.ContextParallel(transformer, self.settings)
        self.transformer = transformer

    def serve(self, editor, shapes: list[Shape]) -> None:
        """Once rank 0's model is ready: wait for every worker's, run a first call of each split (even, uneven) on
        every rank (with compile, the uneven split's graphs compile here), log the plan per served shape, and make
        this the editor's velocity model and LoRA slot."""
        if self.transformer is None:
            raise RuntimeError("serve() before prepare(): the accelerations were not applied with Ranks.prepare")
        t0 = time.perf_counter()
        self._wait_until(lambda w: w.state == "ready")
        self._set_phase(None)
        heads, text = self.context_parallel.heads, sampling.TEXT_TOKENS
        checks = parallel.check_shapes(self.settings, heads, shapes, text)
        seconds = warm_up(self.transformer, checks, velocity_model=self)
        if self.accelerations.compile and self.compile_cache is not None:
            self._save_artifacts()
        for line in parallel.describe_plans(self.settings, heads, shapes, text):
            logger.info("%s", line)
        logger.info(
            "context parallel %s: every rank ready; first calls of each split on all ranks in %.1f s (setup %.1f s)",
            self.settings.describe(),
            seconds,
            time.perf_counter() - t0,
        )
        editor.velocity_model = self
        editor.lora = RankLoras(self, editor.lora)

    def _save_artifacts(self) -> None:
        from flux.optimize import artifact_path, save_artifacts

        save_artifacts(artifact_path(self.rank_cache(0), self.transformer, self.accelerations))
        self._result(self._executor.submit(self._command, "save_artifacts", ()))

    def setup_failed(self, error: BaseException) -> BaseException:
        """What setup raises for `error`: the fault that caused it (naming the rank), if there was one. Ends the
        workers."""
        fault = self._await_fault(error)
        self.close()
        return ParallelError(fault) if fault else error

    # ---- serving -------------------------------------------------------------------------------------------

    def __call__(self, **kwargs) -> tuple[torch.Tensor]:
        """One transformer call on every rank; returns (output,) on rank 0, as the transformer does."""
        self.check()
        return self._result(self._executor.submit(self._call, kwargs))

    def check(self) -> None:
        """Raise ParallelError at once if a fault has ended the workers: the server cannot edit until restarted."""
        if self.fault:
            raise ParallelError(f"this server lost a rank and cannot edit until it is restarted: {self.fault}")

    def new_prediction(self) -> None:
        """At the start of a prediction: check(), and have its first call log how it is split."""
        self.check()
        self._last_plan = None

    @property
    def healthy(self) -> bool:
        return self.fault is None and not self._closed

    def _call(self, kwargs: dict) -> tuple[torch.Tensor]:
        """In the calls' thread: rank 0's inputs to every worker, its own share, the output gathered."""
        seq = next(self._seq)
        self._calls += 1
        specs, tensors = wire_specs(kwargs)
        what = f"transformer call {self._calls}"
        self._set_phase(what, self.settings.call_timeout_s, lambda w: w.done >= seq)
        try:
            for worker in self.workers:
                worker.send(("call", seq, specs))
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
            with torch.inference_mode():
                local = self.transformer(**kwargs)[0]
                output = self.context_parallel.gather(local)
            self._wait_device()
            self._wait_until(lambda w: w.done >= seq)
        except BaseException as e:
            raise self._failure(what, e) from e
        finally:
            self._set_phase(None)
        plan = self.context_parallel.last
        if plan != self._last_plan:
            logger.info("context parallel: %s", plan.describe())
            self._last_plan = plan
        return (output,)

    def _command(self, name: str, args: tuple) -> list[str]:
        """In the calls' thread: a command to every worker, waited for; returns the errors they reported."""
        seq = next(self._seq)
        what = {"lora_use": "fusing the LoRAs", "lora_restore": "taking the LoRAs out"}.get(name, name)
        self._set_phase(what, self.settings.call_timeout_s, lambda w: w.done >= seq)
        try:
            for worker in self.workers:
                worker.send((name, seq, *args))
            self._wait_until(lambda w: w.done >= seq)
        except BaseException as e:
            raise self._failure(what, e) from e
        finally:
            self._set_phase(None)
        return [f"rank {w.rank}: {w.errors[seq]}" for w in self.workers if seq in w.errors]

    def _result(self, future: concurrent.futures.Future):
        """The result of work in the calls' thread, waited for in short slices: coglet cancels a prediction by
        raising an exception in its thread, which lands here. The work in progress is never left half-way on any
        rank: on a cancel (or a failure) this waits for it to end (its deadline bounds the wait), then raises."""
        try:
            while True:
                try:
                    return future.result(timeout=MONITOR_INTERVAL_S)
                except concurrent.futures.TimeoutError:
                    continue
        except BaseException:
            while not future.done():
                with contextlib.suppress(BaseException):  # a second cancel changes nothing: still wait
                    concurrent.futures.wait([future], timeout=MONITOR_INTERVAL_S)
            raise

    def _wait_device(self) -> None:
        """On a GPU, NCCL's collectives return before they finish: wait until this call's work is done, polling, so
        that a fault (which aborts the communicators) or a missed deadline is noticed instead of blocking."""
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()
        while not event.query():
            if self.fault:
                raise ParallelError(self.fault)
            time.sleep(0.0002)

    # ---- waiting, faults ----------------------------------------------------------------------------------

    def _set_phase(self, what: str | None, timeout_s: float = 0.0, finished: Callable[[Worker], bool] = None) -> None:
        with self._lock:
            self._phase = None if what is None else _Phase(what, time.monotonic() + timeout_s, timeout_s, finished)

    def _wait_until(self, finished: Callable[[Worker], bool]) -> None:
        """Until every worker is `finished`; a fault (a worker gone, the deadline missed) raises ParallelError."""
        with self._lock:
            while not all(finished(w) for w in self.workers):
                if self.fault:
                    raise ParallelError(self.fault)
                self._lock.wait(MONITOR_INTERVAL_S)
            if self.fault:
                raise ParallelError(self.fault)

    def _await_fault(self, error: BaseException | None) -> str | None:
        """The fault behind `error`: a collective fails as soon as a peer's socket closes, a moment before the
        monitor sees that the worker has exited; give it that moment."""
        deadline = time.monotonic() + 1.0
        while self.fault is None and time.monotonic() < deadline:
            time.sleep(MONITOR_INTERVAL_S)
        return self.fault

    def _failure(self, what: str, error: BaseException) -> ParallelError:
        """Any failure inside work that spans the ranks leaves them out of step: it is a fault."""
        fault = self._await_fault(error)
        if fault is None:
            self._break(f"rank 0 failed during {what}: {type(error).__name__}: {error}")
        return ParallelError(self.fault)

    def _monitor(self) -> None:
        while not self._closed and self.fault is None:
            time.sleep(MONITOR_INTERVAL_S)
            if self._closed:
                return
            dead = next((w for w in self.workers if w.proc.poll() is not None), None)
            if dead is not None:
                dead.reader.join(timeout=2)  # its last report, if it made one, is read before it is described
                phase = self._phase
                during = f"during {phase.what}" if phase else "between predictions"
                message = f"{dead.describe()} {dead.exit_status()} {during}"
                if dead.failure:
                    message += f": {dead.failure}"
                elif dead.tail:
                    message += f"; its last output: {dead.tail[-1]}"
                self._break(message)
                return
            phase = self._phase
            if phase is not None and time.monotonic() > phase.deadline:
                late = [w for w in self.workers if not phase.finished(w)]
                who = ", ".join(f"{w.describe()}, {w.exit_status()}" for w in late) or "rank 0"
                self._break(f"{phase.what} did not finish on every rank within {phase.timeout_s:g} s: not on {who}")
                return

    def _break(self, message: str) -> None:
        """Record the fault and end the workers: a collective waiting on them then fails (gloo at once; on GPUs
        the communicators are aborted), and nothing runs on the ranks again."""
        with self._lock:
            if self.fault is not None:
                return
            self.fault = message
            self._lock.notify_all()
        logger.error("context parallel: %s; ending the workers (restart the server)", message)
        self._kill()
        if self.device.type == "cuda" and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.distributed_c10d._abort_process_group()

    def _kill(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=10)

    def close(self) -> None:
        """End the workers (asked to stop, then killed): at exit, and when setup fails."""
        if self._closed:
            return
        self._closed = True
        for worker in self.workers:
            with contextlib.suppress(OSError, ValueError):
                worker.send(("stop",))
        deadline = time.monotonic() + 5
        for worker in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._kill()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- the threads that read from the workers ------------------------------------------------------------

    def _read(self, worker: Worker) -> None:
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                return
            with self._lock:
                kind = message[0]
                if kind in ("loaded", "ready"):
                    worker.state = kind
                    logger.info("context parallel: %s %s in %.1f s", worker.describe(), kind, message[1])
                elif kind == "done":
                    _, seq, error = message
                    if error is not None:
                        worker.errors[seq] = error
                    worker.done = seq
                elif kind == "failed":
                    worker.failure = message[1]
                self._lock.notify_all()

    def _relay(self, worker: Worker) -> None:
        """The worker's output, line by line, into rank 0's log stream (and the last lines kept for errors)."""
        for raw in worker.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            worker.tail.append(line)
            with contextlib.suppress(OSError, ValueError):
                print(f"[rank {worker.rank}] {line}", file=sys.stderr, flush=True)
