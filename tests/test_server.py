"""The real Cog server (coglet, started by script/serve as the container starts it) with the tiny
model, driven over HTTP with real image bytes."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import requests

from flux import images
from script.demo import post_prediction
from tests.conftest import make_image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str):
        self.url = url

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=10).json()

    def predict(self, inputs: dict) -> requests.Response:
        return post_prediction(self.url, inputs)


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "FLUX_WEIGHTS": str(tiny_dir), "PYTHON": sys.executable}
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+")
    proc = subprocess.Popen(
        [str(ROOT / "script" / "serve")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    srv = Server(f"http://127.0.0.1:{port}")
    deadline = time.time() + 180
    status = None
    while time.time() < deadline and proc.poll() is None:
        try:
            status = srv.health()["status"]
            if status in ("READY", "SETUP_FAILED"):
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    if status != "READY":
        os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        pytest.fail(f"server did not become READY (status {status}):\n{log.read()[-3000:]}")
    yield srv
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def data_uri(img: PIL.Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def decode_output(output: str) -> PIL.Image.Image:
    header, payload = output.split(",", 1)
    assert header.startswith("data:image/")
    return PIL.Image.open(io.BytesIO(base64.b64decode(payload)))


IMAGE = data_uri(make_image(300, 200), "JPEG")


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_edit_returns_an_image_in_each_format(server, fmt, pil_format):
    r = server.predict(
        {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "seed": 1, "output_format": fmt}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    img = decode_output(body["output"])
    assert img.format == pil_format
    assert img.size == images.kontext_size(300, 200) == (1248, 832)
    assert "Using seed: 1" in body["logs"]
    assert "RANDOM" in body["logs"]


def test_fixed_aspect_ratio_and_seed_zero(server):
    r = server.predict(
        {
            "prompt": "turn it blue",
            "input_image": IMAGE,
            "num_inference_steps": 4,
            "seed": 0,
            "aspect_ratio": "9:16",
            "go_fast": False,
        }
    )
    body = r.json()
    assert body["status"] == "succeeded", body
    assert decode_output(body["output"]).size == (800, 1328)
    assert "Using seed: 0" in body["logs"]
    assert "Transformer calls: 4 of 4" in body["logs"]


@pytest.mark.parametrize(
    "inputs,field",
    [
        ({"input_image": IMAGE}, "prompt"),
        ({"prompt": "x", "input_image": IMAGE, "num_inference_steps": 100}, "num_inference_steps"),
        ({"prompt": "x", "input_image": IMAGE, "aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": "x", "input_image": IMAGE, "guidance": 11}, "guidance"),
        ({"prompt": "x", "input_image": IMAGE, "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "input_image": IMAGE, "acceleration": "warp"}, "acceleration"),
    ],
)
def test_invalid_inputs_get_validation_errors(server, inputs, field):
    r = server.predict(inputs)
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "input", field]]
    assert server.health()["status"] == "READY"


def test_error_inside_the_predictor_names_the_input(server):
    r = server.predict({"prompt": "   ", "input_image": IMAGE, "num_inference_steps": 4})
    body = r.json()
    assert body["status"] == "failed"
    assert "InvalidInputError: prompt must be a non-empty instruction" in body["error"]
    assert server.health()["status"] == "READY"


@pytest.mark.parametrize("value", ["/etc/passwd", "../weights/README.md", "file:///etc/passwd", "predict.py"])
def test_input_image_cannot_name_a_file_on_the_server(server, value):
    body = server.predict({"prompt": "make it red", "input_image": value, "num_inference_steps": 4}).json()
    assert body["status"] == "failed"
    assert "input_image must be an uploaded file, a data URI or an http(s) URL" in body["error"]
    assert "root:" not in body["error"] + body.get("logs", "")
    assert server.health()["status"] == "READY"


def test_bytes_that_are_not_an_image_are_named(server):
    uri = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    body = server.predict({"prompt": "make it red", "input_image": uri, "num_inference_steps": 4}).json()
    assert body["status"] == "failed"
    assert "input_image could not be read as an image" in body["error"]
    assert server.health()["status"] == "READY"
