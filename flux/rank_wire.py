"""What rank 0 and a worker process of a server on several GPUs say to each other, and rank 0's handle on a worker.

Commands and answers go over each worker's control socket (multiprocessing.connection); a transformer call's tensors
go by broadcast over the process group, in the order its specs list them (flux.ranks sends, flux.rank_worker
receives).
"""

from __future__ import annotations

import collections
import multiprocessing.connection
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

TAIL_LINES = 20  # a worker's last output lines, kept for the error that names it


# ---- what rank 0 and a worker say to each other ------------------------------------------------------------
# rank 0 -> worker: ("join",), ("call", seq, specs), ("lora_use", seq, loras), ("lora_restore", seq),
#                   ("save_artifacts", seq), ("stop",)
# worker -> rank 0: ("loaded", seconds), ("ready", seconds), ("done", seq, error or None), ("failed", message)


def wire_specs(kwargs: dict) -> tuple[list[tuple[str, str, object]], list[torch.Tensor]]:
    """A call's keyword arguments as (name, "tensor", (shape, dtype)) or (name, "value", value), and its tensors
    in the order they are broadcast."""
    specs, tensors = [], []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            specs.append((name, "tensor", (tuple(value.shape), str(value.dtype).removeprefix("torch."))))
            tensors.append(value.contiguous())
        else:
            specs.append((name, "value", value))
    return specs, tensors


def receive_kwargs(specs: list[tuple[str, str, object]], device: torch.device) -> dict:
    """The keyword arguments of a call whose specs came from rank 0: tensors received by broadcast, in order."""
    kwargs = {}
    for name, kind, payload in specs:
        if kind == "tensor":
            shape, dtype = payload
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.broadcast(tensor, src=0)
            kwargs[name] = tensor
        else:
            kwargs[name] = payload
    return kwargs


# ---- rank 0's view of a worker -----------------------------------------------------------------------------


@dataclass(eq=False)
class Worker:
    rank: int
    device: torch.device
    proc: subprocess.Popen
    conn: multiprocessing.connection.Connection
    state: str = "starting"  # starting -> loaded -> ready
    done: int = 0  # the last command it finished
    errors: dict[int, str] = field(default_factory=dict)  # a command's error it reported (an unusable LoRA)
    failure: str | None = None  # what it reported before exiting
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None

    def describe(self) -> str:
        return f"rank {self.rank} (pid {self.proc.pid}, {self.device})"

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def exit_status(self) -> str:
        code = self.proc.returncode
        if code is None:
            return f"is {_process_state(self.proc.pid)}"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"


def _process_state(pid: int) -> str:
    """'stopped', 'running', 'sleeping', ... from /proc (what a worker that misses a deadline is doing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "in an unknown state"
    names = {"R": "running", "S": "sleeping", "D": "waiting on the disk", "T": "stopped", "t": "stopped"}
    return names.get(state, f"in state {state}")
