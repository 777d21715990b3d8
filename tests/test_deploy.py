"""The container's setup through the real Cog server (script/serve, as the container runs it), over
loopback: weights fetched from FLUX_WEIGHTS_URL (a comma-separated list, as cog.yaml's `environment` can hold it)
into an empty place after a fetch killed midway, a truncated archive, the refusal to run real weights without a
GPU (before fetching anything), and the OpenAPI schema it serves and validates with, `null` included."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from flux import weight_archives as wa
from flux.model import RANDOM_WEIGHTS_MARKER
from script.openapi_schema import build_schema
from script.pack_weights import pack
from serving.openapi import served_schema
from tests.archive_server import ArchiveServer, Body
from tests.cog_server import ROOT, data_uri, decode_output, free_port, running_server
from tests.conftest import make_image
from tests.hostile_files import encode

IMAGE = data_uri(encode(make_image(96, 64), "PNG"))
EDIT = {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "seed": 1}


@pytest.fixture(scope="module")
def archives(tiny_dir, tmp_path_factory):
    """The tiny model packed in three parts, served over loopback."""
    packed = pack(tiny_dir, tmp_path_factory.mktemp("archives"), max_part_bytes=200_000)
    with ArchiveServer() as server:
        server.archives = [p.path.read_bytes() for p in packed]
        yield server


def _kill_setup_midway(weights: Path, workdir: Path, url: str) -> None:
    """Start the server fetching `url` into `weights`, and SIGKILL it once the fetch has begun."""
    env = {**os.environ, "PORT": str(free_port()), "FLUX_WEIGHTS": str(weights), "FLUX_WEIGHTS_URL": url}
    env["FLUX_DEVICE"] = "cpu"  # the fetched model is a test model, but setup checks the device before fetching
    env["PYTHON"] = sys.executable
    with open(workdir / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [str(ROOT / "script" / "serve")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        # Any file extracted from any archive: the fetch is under way.
        while not any(weights.parent.glob(".*.partial-*/archive-*/*")):
            assert proc.poll() is None, (workdir / "killed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the fetch never started"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def fetched_server(archives, tmp_path_factory):
    """A server whose setup fetched the weights from FLUX_WEIGHTS_URL, after an earlier setup was killed
    while fetching into the same place."""
    workdir = tmp_path_factory.mktemp("fetched")
    weights = workdir / "weights" / "FLUX.1-Kontext-dev"
    urls = [archives.put(f"/part-{i}.tar", data) for i, data in enumerate(archives.archives, 1)]
    # The largest part drips (8 KiB every 0.5 s): the fetch is surely under way, and unfinished, when killed.
    largest = max(range(len(urls)), key=lambda i: len(archives.archives[i]))
    slow = archives.put("/slow.tar", Body(archives.archives[largest], chunk=8 << 10, delay_per_chunk=0.5))
    _kill_setup_midway(weights, workdir, " ".join(slow if i == largest else url for i, url in enumerate(urls)))
    assert not weights.exists() and wa.missing_entries(weights)
    env = {"FLUX_WEIGHTS_URL": ",".join(urls), "FLUX_DEVICE": "cpu"}
    with running_server(weights, workdir, env=env) as server:
        server.weights = weights
        server.urls = urls
        yield server


def test_setup_fetches_the_weights_and_serves_predictions(fetched_server):
    body = fetched_server.predict(EDIT).json()
    assert body["status"] == "succeeded", body
    assert decode_output(body["output"]).size == (1248, 832)  # 3:2, snapped to a Kontext resolution
    assert wa.missing_entries(fetched_server.weights) == []
    # The killed setup's staging directory was cleaned up; nothing else was left beside the weights.
    assert sorted(p.name for p in fetched_server.weights.parent.iterdir()) == [
        ".FLUX.1-Kontext-dev.lock",
        "FLUX.1-Kontext-dev",
    ]


def test_setup_logs_where_the_weights_came_from_and_the_runtime(fetched_server):
    logs = fetched_server.health()["setup"]["logs"]
    assert "removing" in logs and "left by an interrupted fetch" in logs
    assert f"fetched from {fetched_server.urls[0]}" in logs
    assert f"runtime: torch {__import__('torch').__version__}" in logs
    assert "loaded and prepared the model on cpu in" in logs


def test_the_server_serves_the_schema_cog_builds_with_null_accepted_and_list_items_bounded(fetched_server):
    served = requests.get(f"{fetched_server.url}/openapi.json", timeout=10).json()
    assert served == served_schema(build_schema())
    assert served["components"]["schemas"]["PredictionRequest"]["required"] == ["input"]
    assert requests.post(f"{fetched_server.url}/predictions", json={}, timeout=30).status_code == 422
    lora_strength = served["components"]["schemas"]["Input"]["properties"]["lora_strength"]
    assert lora_strength["type"] == ["array", "null"] and lora_strength["nullable"] is True
    assert lora_strength["items"] == {"type": "number", "minimum": -1, "maximum": 3}
    assert served["openapi"] == "3.1.0"
    assert "/predictions" in served["paths"] and "PredictionResponse" in served["components"]["schemas"]


def _post(server, inputs: dict) -> requests.Response:
    for _ in range(40):
        r = requests.post(f"{server.url}/predictions", json={"input": inputs}, timeout=300)
        if r.status_code != 409:
            return r
        time.sleep(0.25)
    return r


def test_every_optional_input_absent_or_null_is_what_the_schema_says(fetched_server):
    """Absent: the default. null: accepted where Cog's schema says nullable (it means "not given"), else a 422
    naming the input."""
    schema = build_schema()["components"]["schemas"]["Input"]
    optional = [name for name in schema["properties"] if name not in schema["required"]]
    assert len(optional) == 16
    minimal = {"prompt": "make the car red", "input_image": IMAGE}
    body = _post(fetched_server, minimal).json()
    assert body["status"] == "succeeded", body
    assert body["metrics"]["steps"] == 28 and body["metrics"]["transformer_calls"] == 13  # the defaults
    cheap = {**minimal, "num_inference_steps": 4, "megapixels": "0.25"}
    for name in optional:
        r = _post(fetched_server, {**cheap, name: None})
        if schema["properties"][name].get("nullable"):
            assert r.status_code == 200 and r.json()["status"] == "succeeded", (name, r.text)
        else:
            assert r.status_code == 422, (name, r.text)
            assert {tuple(d["loc"]) for d in r.json()["detail"]} == {("body", "input", name)}, r.text
    nullable = [name for name in optional if schema["properties"][name].get("nullable")]
    assert nullable == ["input_images", "mask", "seed", "lora_weights", "lora_strength"]


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"num_inference_steps": 3}, "num_inference_steps"),
        ({"guidance": 10.5}, "guidance"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": None}, "prompt"),
    ],
    ids=["below-minimum", "above-maximum", "not-a-choice", "missing"],
)
def test_the_server_validates_with_the_schema(fetched_server, bad, field):
    inputs = {k: v for k, v in {**EDIT, **bad}.items() if v is not None}
    for _ in range(40):
        r = requests.post(f"{fetched_server.url}/predictions", json={"input": inputs}, timeout=30)
        if r.status_code != 409:
            break
        time.sleep(0.25)
    assert r.status_code == 422, r.text
    assert ["body", "input", field] in [d["loc"] for d in r.json()["detail"]]


def test_a_truncated_archive_fails_setup_naming_the_url(archives, tmp_path):
    data = archives.archives[1]
    url = archives.put("/truncated.tar", data[: len(data) // 2])
    weights = tmp_path / "weights" / "FLUX.1-Kontext-dev"
    env = {"FLUX_WEIGHTS_URL": f"{archives.url}/part-1.tar {url}?X-Signature=s3cr3t", "FLUX_DEVICE": "cpu"}
    archives.put("/part-1.tar", archives.archives[0])
    with running_server(weights, tmp_path, env=env, wait_for=("SETUP_FAILED",)) as server:
        logs = server.health()["setup"]["logs"]
        assert "WeightsError" in logs and f"{url}?… is not a whole tar archive" in logs
        assert "s3cr3t" not in logs
        assert requests.post(f"{server.url}/predictions", json={"input": EDIT}, timeout=30).status_code >= 400
    assert not weights.exists()
    assert [p.name for p in weights.parent.iterdir()] == [".FLUX.1-Kontext-dev.lock"]


def test_without_a_gpu_setup_fails_before_fetching_anything(archives, tmp_path):
    """Weights still to be fetched count as real ones: no GPU fails setup at once, and no archive is read."""
    url = archives.put("/never.tar", archives.archives[0])
    weights = tmp_path / "weights" / "FLUX.1-Kontext-dev"
    env = {"FLUX_WEIGHTS_URL": url, "FLUX_DEVICE": ""}
    with running_server(weights, tmp_path, env=env, wait_for=("SETUP_FAILED",)) as server:
        logs = server.health()["setup"]["logs"]
        assert "DeviceError" in logs and "no CUDA GPU is visible to torch" in logs
    assert archives.requests["/never.tar"] == 0 and not weights.exists()


def test_real_weights_without_a_gpu_fail_setup(tiny_dir, tmp_path):
    """Weights without the test-model marker stand in for the real ones: on this CPU-only machine, setup
    must refuse them instead of loading a 67 GB float32 model on the CPU."""
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights)
    (weights / RANDOM_WEIGHTS_MARKER).unlink()
    with running_server(weights, tmp_path, env={"FLUX_DEVICE": ""}, wait_for=("SETUP_FAILED",)) as server:
        logs = server.health()["setup"]["logs"]
        assert "DeviceError" in logs and "no CUDA GPU is visible to torch" in logs and "FLUX_DEVICE=cpu" in logs
