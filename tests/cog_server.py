"""Starting the real Cog server (script/serve: coglet, as the container runs it) and talking to it."""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import requests

from script.demo import post_prediction

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def decode_output(output: str) -> PIL.Image.Image:
    header, payload = output.split(",", 1)
    assert header.startswith("data:image/")
    return PIL.Image.open(io.BytesIO(base64.b64decode(payload)))


def output_bytes(body: dict) -> bytes:
    return base64.b64decode(body["output"].split(",", 1)[1])


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, tmpdir: Path):
        self.url = url
        self.proc = proc
        self.log = log
        self.tmpdir = tmpdir  # the server's TMPDIR: where inputs and outputs are written

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def predict(self, inputs: dict) -> requests.Response:
        """A synchronous prediction (retried briefly on 409 while the slot is released)."""
        return post_prediction(self.url, inputs)

    def predict_async(self, inputs: dict, webhook: str, attempts: int = 400) -> str:
        """Start a prediction with Prefer: respond-async; retry on 409 until the slot is free.
        Returns its id; its progress and result are POSTed to `webhook`."""
        body = {"input": inputs, "webhook": webhook, "webhook_events_filter": ["start", "logs", "completed"]}
        for _ in range(attempts):
            r = requests.post(f"{self.url}/predictions", json=body, headers={"Prefer": "respond-async"}, timeout=30)
            if r.status_code != 409:
                assert r.status_code == 202, r.text
                return r.json()["id"]
            time.sleep(0.25)
        raise AssertionError(f"the server stayed busy: {r.text}")

    def cancel(self, prediction_id: str) -> requests.Response:
        return requests.post(f"{self.url}/predictions/{prediction_id}/cancel", timeout=10)

    def worker_pids(self) -> list[int]:
        """The processes under the server (coglet runs predictions in a worker subprocess)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    todo += [int(c) for c in (task / "children").read_text().split()]
            if pid != self.proc.pid:
                found.append(pid)
        return found

    def rss_mib(self) -> float:
        """Resident memory of the server's worker processes, in MiB."""
        total_kib = 0
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total_kib += int(line.split()[1])
        return total_kib / 1024

    def log_lines(self, prediction_id: str) -> list[tuple[float, str]]:
        """(unix time, message) of each line the server logged for one prediction."""
        lines = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                if entry["fields"].get("prediction_id") == prediction_id:
                    when = datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
                    lines.append((when, entry["fields"]["message"]))
        return lines

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_server(
    weights: Path | None,
    workdir: Path,
    env: dict[str, str] | None = None,
    wait_for: tuple[str, ...] = ("READY",),
    args: tuple[str, ...] = (),
) -> Iterator[Server]:
    """Run script/serve (with `args`) on a free port with FLUX_WEIGHTS=weights (None: as the environment has it)
    and TMPDIR=workdir/tmp; wait until its health check reports one of `wait_for` (fail on any other final
    state); stop it afterwards."""
    port = free_port()
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    full_env = {
        **os.environ,
        "PORT": str(port),
        **({"FLUX_WEIGHTS": str(weights)} if weights is not None else {}),
        "PYTHON": sys.executable,
        "TMPDIR": str(tmpdir),
        **(env or {}),
    }
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [str(ROOT / "script" / "serve"), *args],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, tmpdir)
    try:
        deadline = time.time() + 300
        status = None
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(requests.ConnectionError):
                status = server.health()["status"]
                if status in ("READY", "SETUP_FAILED"):
                    break
            time.sleep(0.5)
        if status not in wait_for:
            raise AssertionError(f"server status {status}, wanted {wait_for}:\n{server.log_text()[-3000:]}")
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
