"""The real server on the device: script/serve (coglet, as the container runs it) on the tiny model, with one
prediction per TaylorSeer level over HTTP on loopback, each recorded with its status and seconds.

    python -m measure.serve_check --device cuda --jsonl out/quick-serve.jsonl     # on the GPU machine
    python -m measure.serve_check --device cpu                                     # the same on the CPU

What it shows on a GPU: the wheels carried for the image (cog, coglet and their one missing requirement)
install and serve, setup puts the model and the safety checker on CUDA, and a prediction runs end to end
there (download of the input as a data URI, the edit, the check, the encoding, the response). The tiny model
says nothing about speed. The server runs without compile (FLUX_ACCELERATIONS=off): what compile does on the
GPU is measured on the full-size model by measure.quick.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from flux.taylor_seer_utils import AccelerationLevel
from measure import records
from script.demo import post_prediction

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / "examples" / "car.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    """The health check's last answer once the server is READY, has failed its setup, exited, or timed out."""
    deadline = time.monotonic() + timeout
    health: dict = {"status": "not answering"}
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            health = requests.get(f"{url}/health-check", timeout=5).json()
        except requests.RequestException:
            pass
        if health.get("status") in ("READY", "SETUP_FAILED"):
            return health
        time.sleep(0.25)
    return health | ({"status": f"exited ({proc.returncode})"} if proc.poll() is not None else {})


def check(args: argparse.Namespace, writer: records.RowWriter, workdir: Path) -> int:
    import torch

    from flux.tiny import write_tiny_model

    device = torch.device("cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu")
    command = " ".join(["python -m measure.serve_check", *args.argv])
    writer.write("meta", **records.environment(device), config="tiny", command=command, random_weights=True)
    weights = write_tiny_model(workdir / "tiny")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        FLUX_WEIGHTS=str(weights),
        FLUX_DEVICE=args.device,
        FLUX_ACCELERATIONS="off",
        PYTHON=sys.executable,
        TMPDIR=str(workdir),
    )
    log = (workdir / "server.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(ROOT / "script" / "serve")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, process_group=0
    )
    failures = 0
    try:
        health = wait_ready(url, proc, args.setup_timeout)
        ready = health.get("status") == "READY"
        writer.write("serve setup", status=health.get("status"), seconds=time.perf_counter() - t0, device=args.device)
        if not ready:
            print(f"the server did not become ready: {health}", file=sys.stderr)
            return 1
        image = "data:image/jpeg;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        for level in AccelerationLevel:
            inputs = {"prompt": "make the car red", "input_image": image, "seed": 0, "acceleration": level.value}
            inputs["num_inference_steps"] = args.steps
            t1 = time.perf_counter()
            response = post_prediction(url, inputs)
            seconds = time.perf_counter() - t1
            body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
            ok = response.status_code == 200 and body.get("status") == "succeeded"
            failures += not ok
            output = body.get("output") or ""
            writer.write(
                "serve",
                level=level.value,
                steps=args.steps,
                http=response.status_code,
                status=body.get("status"),
                seconds=seconds,
                predict_time=(body.get("metrics") or {}).get("predict_time"),
                metrics=body.get("metrics"),
                output_bytes=len(base64.b64decode(output.split(",", 1)[1])) if output.startswith("data:") else None,
                error=body.get("error"),
            )
    finally:
        records.stop_group(proc)
        log.close()
        tail = (workdir / "server.log").read_text(errors="replace")[-3000:]
        if failures or proc.returncode not in (0, -signal.SIGTERM):
            print(f"server log (end):\n{tail}", file=sys.stderr)
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="FLUX_DEVICE for the server")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--setup-timeout", type=float, default=240.0, help="seconds to wait for READY")
    records.add_row_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, writer = records.start(build_parser(), argv)
    with writer, tempfile.TemporaryDirectory(prefix="flux-serve-check-") as workdir:
        return check(args, writer, Path(workdir))


if __name__ == "__main__":
    raise SystemExit(main())
