"""A worker process of a server on several GPUs (rank 1, 2, ...): started by flux.ranks on rank 0, never by hand.

It loads the transformer onto its own device and applies the server's accelerations, joins the process group
with context parallelism (flux.parallel), compiles and warms up with the other ranks, then runs what rank 0 sends
over its control socket: its share of each transformer call, and the request's LoRAs fused (kept while the next
request asks for the same ones, as on rank 0).
It reports every failure to rank 0 before exiting, and exits when rank 0 does (its control socket closes, or its
parent process is gone).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import logging
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from flux import parallel
from flux.errors import InvalidInputError
from flux.lora import LoraSlot
from flux.model import load_transformer
from flux.optimize import AccelerationConfig, artifact_path, optimize, save_artifacts
from flux.pipeline import served_shapes
from flux.rank_wire import receive_kwargs

logger = logging.getLogger("flux.rank_worker")

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Exit when rank 0's process is gone, whatever this one is doing: the kernel's parent-death signal where
    there is one, and a thread that watches the parent id (the signal follows the thread that started us)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    if os.getppid() != parent:
        os._exit(3)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class RankWorker:
    def __init__(self, args: argparse.Namespace, conn: multiprocessing.connection.Connection):
        self.rank = args.rank
        self.conn = conn
        self.device = torch.device(args.device)
        self.settings = parallel.ParallelSettings(**json.loads(args.settings))
        self.accelerations = AccelerationConfig.parse(args.accelerations)
        self.compile_cache = Path(args.compile_cache) if args.compile_cache else None
        self.args = args
        self.transformer: torch.nn.Module | None = None
        self.context_parallel: parallel.ContextParallel | None = None

    def setup(self) -> None:
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.transformer = load_transformer(self.args.weights, self.device, getattr(torch, self.args.dtype))
        self.slot = LoraSlot(self.transformer)
        self.conn.send(("loaded", time.perf_counter() - t0))
        message = self.conn.recv()
        if message != ("join",):
            raise RuntimeError(f"expected to be told to join the process group, got {message[0]!r}")
        store = dist.TCPStore(
            "127.0.0.1",
            self.args.store_port,
            self.settings.degree,
            False,
            datetime.timedelta(seconds=self.settings.setup_timeout_s),
        )

        def prepare(transformer: torch.nn.Module) -> None:
            parallel.join_group(self.rank, self.settings, store, self.device)
            self.context_parallel = parallel.ContextParallel(transformer, self.settings)

        # The same shapes, in the same order, as rank 0's KontextEditor.from_pretrained: its calls are ours.
        optimize(self.transformer, self.accelerations, self.compile_cache, served_shapes(), prepare=prepare)
        self.conn.send(("ready", time.perf_counter() - t0))

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except EOFError:
                logger.info("rank 0 closed the control socket: exiting")
                return
            kind, args = message[0], message[1:]
            if kind == "stop":
                return
            seq, error = args[0], None
            if kind == "call":
                self._call(args[1])
            elif kind == "lora_use":
                try:
                    self.slot.use(args[1])  # the same calls as rank 0's slot: the same LoRAs kept fused
                except InvalidInputError as e:  # rank 0 reads the same file: it fails the request for it
                    error = str(e)
            elif kind == "lora_restore":
                self.slot.restore()
            elif kind == "save_artifacts":
                save_artifacts(artifact_path(self.compile_cache, self.transformer, self.accelerations))
            else:
                raise RuntimeError(f"unknown command {kind!r} from rank 0")
            self.conn.send(("done", seq, error))

    @torch.inference_mode()
    def _call(self, specs: list) -> None:
        kwargs = receive_kwargs(specs, self.device)
        local = self.transformer(**kwargs)[0]
        self.context_parallel.gather(local)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # "done" means done: rank 0 names the ranks that are not


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--weights", required=True)
    p.add_argument("--accelerations", required=True)
    p.add_argument("--compile-cache", default="")
    p.add_argument("--settings", required=True, help="flux.parallel.ParallelSettings as JSON")
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--parent", type=int, required=True)
    p.add_argument("--threads", type=int, help="torch's threads on the CPU (rank 0's share of the cores)")
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    os.set_inheritable(args.control_fd, False)  # not into the compiler's worker processes
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    conn = multiprocessing.connection.Connection(args.control_fd)
    worker = RankWorker(args, conn)
    try:
        worker.setup()
        worker.serve()
    except BaseException as e:
        logger.error("rank %d failed:\n%s", args.rank, traceback.format_exc())
        with contextlib.suppress(OSError, ValueError):
            conn.send(("failed", f"{type(e).__name__}: {e}"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
