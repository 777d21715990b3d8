"""Start script/serve, send one edit over HTTP, write the edited image to a file, stop the server. Prints the
prediction's logs and metrics; the server's own log goes to server.log beside the image."""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = "out/tiny-model"  # where the demo and `script/serve --tiny` keep the tiny model


def post_prediction(url: str, inputs: dict, attempts: int = 100) -> requests.Response:
    """POST /predictions, retrying briefly on 409: the server takes one prediction at a time and
    answers 409 until its slot is released, which can be a moment after the previous response."""
    for _ in range(attempts):
        r = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=600)
        if r.status_code != 409:
            return r
        time.sleep(0.05)
    return r


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited during setup")
        try:
            health = requests.get(f"{url}/health-check", timeout=5).json()
            if health["status"] == "READY":
                return
            if health["status"] == "SETUP_FAILED":
                raise SystemExit(f"setup failed:\n{health['setup'].get('logs', '')[-2000:]}")
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready in time")


def metrics_lines(metrics: dict) -> list[str]:
    """A prediction's metrics, one per line and aligned; a nested group (seconds per phase) on one line."""

    def value(v: object) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k} {value(x)}" for k, x in v.items())
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    ordered = sorted(metrics.items(), key=lambda item: item[0] == "predict_time")  # the whole time last
    width = max(map(len, metrics), default=0)
    return [f"  {name:<{width}}  {value(v)}" for name, v in ordered]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image", default=str(ROOT / "examples" / "car.jpg"))
    p.add_argument("--prompt", default="make the car red")
    p.add_argument("--steps", type=int, help="denoising steps (default: the server's, 28)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--format", default="webp", choices=["webp", "jpg", "png"])
    p.add_argument("--out", default=str(ROOT / "out"))
    p.add_argument("--port", type=int, default=5055)
    args = p.parse_args()

    env = dict(os.environ, PORT=str(args.port), PYTHON=sys.executable)
    if not env.get("FLUX_WEIGHTS"):
        tiny = ROOT / TINY_MODEL
        command = [sys.executable, "-m", "flux.tiny", "--if-missing", str(tiny)]
        written = subprocess.run(command, cwd=ROOT, capture_output=True)
        if written.returncode:
            sys.stderr.buffer.write(written.stdout + written.stderr)
            return written.returncode
        env["FLUX_WEIGHTS"] = str(tiny)
        print("Using the tiny RANDOM-weight model: the output shows the path works, not a real edit.")

    url = f"http://127.0.0.1:{args.port}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The server logs every line as a JSON record (coglet's tracing, on stderr): kept in a file, not printed.
    server_log = out_dir / "server.log"
    with open(server_log, "wb") as log:
        server = subprocess.Popen(
            [str(ROOT / "script" / "serve")], cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        try:
            wait_ready(url, server)
        except SystemExit:
            print(f"The server's log: {server_log}", file=sys.stderr)
            raise
        mime = mimetypes.guess_type(args.image)[0] or "application/octet-stream"
        data = base64.b64encode(Path(args.image).read_bytes()).decode()
        inputs = {
            "prompt": args.prompt,
            "input_image": f"data:{mime};base64,{data}",
            "seed": args.seed,
            "output_format": args.format,
        }
        if args.steps is not None:
            inputs["num_inference_steps"] = args.steps
        started = time.time()
        body = post_prediction(url, inputs).json()
        if body.get("status") != "succeeded":
            print(body.get("logs", ""), body.get("error") or body, file=sys.stderr)
            print(f"The server's log: {server_log}", file=sys.stderr)
            return 1
        target = out_dir / f"edited.{args.format}"
        target.write_bytes(base64.b64decode(body["output"].split(",", 1)[1]))
        print(body.get("logs", ""), end="")
        print("Metrics:", *metrics_lines(body.get("metrics") or {}), sep="\n")
        print(f"Wrote {target} ({time.time() - started:.1f} s)")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
