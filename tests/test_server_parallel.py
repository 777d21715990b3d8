"""Several GPUs through the real Cog server, on the CPU: FLUX_GPUS=2 runs two processes on gloo with the tiny model
(two attention heads, so that Ulysses can split them).

The same image as one process at every TaylorSeer level, with an uneven split, several images and a LoRA; cancel
stops every rank; a worker killed mid-edit, a worker that stops answering (the deadline) and a worker failing setup
end the prediction or setup with an error naming the rank, later predictions fail at once, the health check turns
UNHEALTHY; no process is left behind."""

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from flux.tiny import SyntheticConfig, write_tiny_lora, write_tiny_model
from tests import test_server_lifecycle
from tests.cog_server import ROOT, data_uri, decode_output, output_bytes, running_server
from tests.conftest import make_image
from tests.hostile_files import encode
from tests.http_fixtures import LocalHTTP
from tests.test_server_lifecycle import steps_logged

TWO_HEADS = SyntheticConfig(num_attention_heads=2)
IMAGE = data_uri(encode(make_image(300, 200), "PNG"))
SECOND = data_uri(encode(make_image(160, 240, seed=4), "PNG"))
MASK_IMAGE = PIL.Image.new("L", (300, 200), 0)
MASK_IMAGE.paste(255, (150, 0, 300, 200))  # the right half is edited
MASK = data_uri(encode(MASK_IMAGE, "PNG"))
BASE = {"prompt": "make the car red", "input_image": IMAGE, "seed": 1, "megapixels": "0.25", "output_format": "png"}
CASES = {
    # 10 steps: each level skips some (go fast 9 calls, go really fast 7)
    "none": {"num_inference_steps": 10, "acceleration": "none"},
    "go fast": {"num_inference_steps": 10, "acceleration": "go fast"},
    "go really fast": {"num_inference_steps": 10, "acceleration": "go really fast"},
    # 21:9 output from a 3:2 input: 1029 noise + 1014 context tokens, which 2 ranks split unevenly
    "uneven split": {"num_inference_steps": 4, "aspect_ratio": "21:9"},
    "stitch": {"num_inference_steps": 4, "input_images": [SECOND]},
    "separate": {"num_inference_steps": 4, "input_images": [SECOND, IMAGE], "multi_image_mode": "separate"},
    "lora": {"num_inference_steps": 4},
    # the kept region put back after every step on rank 0, the edit started from the input
    "mask and strength": {"num_inference_steps": 6, "mask": MASK, "strength": 0.7},
}
# 1 MP, 50 steps, every step computed: long enough to act on mid-edit
SLOW = {**BASE, "megapixels": "1", "num_inference_steps": 50, "go_fast": False}
TOLERANCE = 1
"""Grey levels an image from two processes may differ by from one process's: the ranks add up the attention in
another order (Ulysses exchanges the sequence), floating-point rounding that reaches a pixel here and there."""
FAULT = "this server lost a rank and cannot edit until it is restarted"
BIG_LORA_RANK = 65536
"""A LoRA this large (235 MB for the two-head model) keeps each rank reading and fusing it for one to two seconds
on this CPU: long enough for a cancel to land in it."""
CANCEL_AFTER_S = 0.3
"""After the prediction logs its seed (its inputs read, the LoRA fetched), the LoRA's use starts within ~0.1 s."""
INTERRUPTED = "context parallel: the LoRAs' use did not finish alike on every rank"
hooks = test_server_lifecycle.hooks  # the webhooks fixture (module-scoped: one local HTTP server per module)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("weights") / "tiny-2-heads", TWO_HEADS)


@pytest.fixture(scope="module")
def one(two_heads, tmp_path_factory):
    with running_server(two_heads, tmp_path_factory.mktemp("one"), {"FLUX_GPUS": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def two(two_heads, tmp_path_factory):
    with contextlib.ExitStack() as stack:
        env = {"FLUX_GPUS": "2", "FLUX_ALLOW_PRIVATE_URLS": "1"}  # the big LoRA comes from a server on loopback
        server = stack.enter_context(running_server(two_heads, tmp_path_factory.mktemp("two"), env))
        server.stop = stack.close
        yield server


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    path = write_tiny_lora(tmp_path_factory.mktemp("lora"), cfg=TWO_HEADS)
    return data_uri(path.read_bytes(), "application/octet-stream")


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory):
    """The URL of a LoRA of rank BIG_LORA_RANK, served on loopback; its alpha makes it change the image as much as
    the small one (peft's gaussian init scales A by 1 / rank)."""
    rank = BIG_LORA_RANK
    path = write_tiny_lora(tmp_path_factory.mktemp("big-lora"), seed=2, rank=rank, alpha=rank * 256.0, cfg=TWO_HEADS)
    http = LocalHTTP({"/big.safetensors": (path.read_bytes(), "application/octet-stream")})
    yield f"{http.url}/big.safetensors"
    http.close()


def pixels(body: dict) -> np.ndarray:
    assert body["status"] == "succeeded", (body.get("error"), (body.get("logs") or "")[-2000:])
    return np.asarray(decode_output(body["output"]).convert("RGB")).astype(np.int16)


def rank_pids(server) -> dict[int, int]:
    """The worker processes (flux.rank_worker) under the server, by rank."""
    found = {}
    for pid in server.worker_pids():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "flux.rank_worker" in argv:
                found[int(argv[argv.index("--rank") + 1])] = pid
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def left_behind(pids, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def signal_mid_edit(server, hooks, sig: signal.Signals) -> tuple[int, float, float, dict]:
    """Start a slow edit, send rank 1's worker `sig` after two steps; (its pid, when, when the edit ended, result)."""
    worker = rank_pids(server)[1]
    pid = server.predict_async(SLOW, hooks.url)
    hooks.wait(pid, lambda p: steps_logged(p) >= 2)
    signalled_at = time.monotonic()
    os.kill(worker, sig)
    ended_at, result = hooks.completed(pid)
    assert result["status"] == "failed", result
    return worker, signalled_at, ended_at, result


def wait_logged(server, prediction_id: str, text: str, timeout: float = 120.0) -> None:
    """Until the server's log holds a line for the prediction with `text` in it (read as the log grows)."""
    deadline, pending = time.monotonic() + timeout, ""
    with open(server.log, errors="replace") as log:
        while time.monotonic() < deadline:
            pending += log.readline()
            if not pending.endswith("\n"):
                time.sleep(0.005)
                continue
            if prediction_id in pending and text in pending:
                return
            pending = ""
    raise AssertionError(f"{text!r} not logged for {prediction_id} within {timeout} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_image_of_one(one, two, lora, case):
    inputs = {**BASE, **CASES[case]}
    if case == "lora":
        inputs.update(lora_weights=[lora], lora_strength=[1.0])
    single, double = one.predict(inputs).json(), two.predict(inputs).json()
    diff = np.abs(pixels(single) - pixels(double))
    print(f"{case}: max {diff.max()} grey levels, {(diff > 0).mean():.4%} of the values differ")
    assert diff.max() <= TOLERANCE and (diff > 0).mean() < 0.005
    assert single["metrics"]["transformer_calls"] == double["metrics"]["transformer_calls"]
    (split,) = [message for _, message in two.log_lines(double["id"]) if "context parallel:" in message]
    tokens = int(re.search(r"(\d+) image \+ 512 text tokens over 2 ranks", split).group(1))
    assert ("uneven (ulysses_anything)" in split) == (tokens % 2 == 1), split
    assert tokens % 2 == 1 or case != "uneven split"
    if case == "lora":  # the LoRA is on every rank's share: without it on one, the images would differ widely
        plain = pixels(two.predict({**BASE, **CASES[case]}).json())
        assert np.abs(plain - pixels(double)).mean() > 20 * TOLERANCE
        # Taken out on every rank after "none", fused again, then kept on every rank: the same image each time.
        again, warm = two.predict(inputs).json(), two.predict(inputs).json()
        assert (again["metrics"]["lora_reused"], warm["metrics"]["lora_reused"]) == (False, True)
        assert output_bytes(again) == output_bytes(warm) == output_bytes(double)


def test_cancel_stops_every_rank_before_its_next_step(two, hooks):
    reference = output_bytes(two.predict({**BASE, "num_inference_steps": 4}).json())
    (worker,) = rank_pids(two).values()
    pid = two.predict_async(SLOW, hooks.url)
    started, _ = hooks.wait(pid, lambda p: p["status"] == "processing")
    _, progress = hooks.wait(pid, lambda p: steps_logged(p) >= 3)
    cancelled_at = time.monotonic()
    assert two.cancel(pid).status_code == 200
    canceled_at, result = hooks.completed(pid)
    assert result["status"] == "canceled"
    step_seconds = (cancelled_at - started) / steps_logged(progress)
    # The worker computes nothing more: its CPU time stands still.
    before = cpu_seconds(worker)
    time.sleep(1.0)
    idle = cpu_seconds(worker) - before
    next_id = two.predict_async({**BASE, "num_inference_steps": 4}, hooks.url)
    print(
        f"cancel: canceled {canceled_at - cancelled_at:.2f} s after the request (a step takes {step_seconds:.2f} s); "
        f"rank 1 used {idle:.3f} s of CPU in the second after"
    )
    assert canceled_at - cancelled_at < step_seconds + 0.5
    assert idle < 0.1
    # Every rank stopped at the same call: the next edit runs in step, with the bytes it had before.
    _, after = hooks.completed(next_id)
    assert output_bytes(after) == reference
    assert rank_pids(two) == {1: worker} and two.health()["status"] == "READY"


def test_a_cancel_while_rank_0_fuses_loras_leaves_the_server_healthy_and_every_rank_in_step(two, hooks, big_lora):
    """coglet cancels by raising CancelationException in the prediction's thread (replicate/cog
    crates/coglet-python/src/cancel.rs: PyThreadState_SetAsyncExc): on rank 0 it can land while the LoRA is read or
    fused there, after the workers have fused it. The server stays healthy, and the next use restores every rank's
    weights before fusing afresh."""
    edit = {**BASE, "num_inference_steps": 4}
    with_lora = {**edit, "lora_weights": [big_lora]}
    reference = two.predict(with_lora).json()
    plain = two.predict(edit).json()  # takes the LoRA out on every rank: the next request fuses it cold
    assert np.abs(pixels(reference) - pixels(plain)).mean() > 20 * TOLERANCE  # the LoRA changes the image
    workers = rank_pids(two)
    for attempt in range(3):
        pid = two.predict_async(with_lora, hooks.url)
        wait_logged(two, pid, "Using seed")  # its inputs are read: the LoRA's use begins a moment later
        time.sleep(CANCEL_AFTER_S)
        assert two.cancel(pid).status_code == 200
        _, result = hooks.completed(pid)
        assert result["status"] == "canceled", result
        health = two.health()
        assert health["status"] == "READY", (health, two.log_text()[-3000:])
        logged = [message for _, message in two.log_lines(pid)]
        if any(INTERRUPTED in message for message in logged):
            break
        print(f"attempt {attempt + 1}: the cancel landed outside the LoRA's use; last lines: {logged[-3:]}")
        two.predict(edit)  # the LoRA out again, if the cancel came after its use
    else:
        raise AssertionError("no cancel landed while rank 0 read or fused the LoRA")
    after = two.predict(with_lora).json()
    assert (after["metrics"]["lora_reused"], "lora_resync" in after["metrics"]["seconds"]) == (False, True)
    warm = two.predict(with_lora).json()
    assert (warm["metrics"]["lora_reused"], "lora_resync" in warm["metrics"]["seconds"]) == (True, False)
    assert output_bytes(after) == output_bytes(warm) == output_bytes(reference)
    assert output_bytes(two.predict(edit).json()) == output_bytes(plain)
    assert rank_pids(two) == workers and two.health()["status"] == "READY"
    print(f"cancel during the LoRA's use (attempt {attempt + 1}): re-synced in {after['metrics']['seconds']}")


def test_a_lora_every_rank_refuses_keeps_every_rank_in_step_and_the_warm_lora_warm(two, lora):
    """Each rank's slot refuses an unusable file before changing anything: no re-sync is needed after it."""
    inputs = {**BASE, "num_inference_steps": 4, "lora_weights": [lora]}
    fused = two.predict(inputs).json()
    broken = data_uri(b"not a safetensors file", "application/octet-stream")
    refused = two.predict({**inputs, "lora_weights": [broken]}).json()
    assert refused["status"] == "failed" and "lora_weights is not a readable .safetensors file" in refused["error"]
    warm = two.predict(inputs).json()
    assert (warm["metrics"]["lora_reused"], "lora_resync" in warm["metrics"]["seconds"]) == (True, False)
    assert output_bytes(warm) == output_bytes(fused) and two.health()["status"] == "READY"


def test_shutdown_ends_every_worker_process(two):
    pids = two.worker_pids()
    assert rank_pids(two), pids
    two.stop()
    assert left_behind(pids) == []


def test_a_killed_worker_fails_the_edit_naming_it_and_every_later_edit_at_once(two_heads, tmp_path, hooks):
    with running_server(two_heads, tmp_path, {"FLUX_GPUS": "2"}) as server:
        pids = server.worker_pids()
        worker, killed_at, failed_at, result = signal_mid_edit(server, hooks, signal.SIGKILL)
        assert f"rank 1 (pid {worker}, cpu) was killed by SIGKILL during transformer call" in result["error"]
        t0 = time.monotonic()
        body = server.predict(BASE).json()
        refused = time.monotonic() - t0
        assert body["status"] == "failed" and FAULT in body["error"] and "rank 1" in body["error"]
        health = server.health()
        assert health["status"] == "UNHEALTHY", health
        print(f"killed worker: the edit failed {failed_at - killed_at:.2f} s after; the next one in {refused:.3f} s")
        assert failed_at - killed_at < 5 and refused < 2
    assert left_behind(pids) == []


def test_a_worker_that_stops_answering_misses_the_deadline(two_heads, tmp_path, hooks):
    timeout = 3
    with running_server(two_heads, tmp_path, {"FLUX_GPUS": "2", "FLUX_PARALLEL_TIMEOUT_S": str(timeout)}) as server:
        worker, stopped_at, failed_at, result = signal_mid_edit(server, hooks, signal.SIGSTOP)
        error = result["error"]
        assert (
            f"did not finish on every rank within {timeout} s: not on rank 1 (pid {worker}, cpu), is stopped" in error
        )
        print(f"stopped worker: the edit failed {failed_at - stopped_at:.2f} s after ({timeout} s deadline)")
        assert timeout <= failed_at - stopped_at < timeout + 3
        assert left_behind([worker]) == []  # rank 0 ended it
        assert FAULT in server.predict(BASE).json()["error"]


def test_a_worker_failing_setup_fails_setup_naming_it(two_heads, tmp_path):
    env = {"FLUX_GPUS": "2", "PYTHONPATH": str(ROOT / "tests" / "rank1_cannot_read_weights")}
    t0 = time.monotonic()
    with running_server(two_heads, tmp_path, env, wait_for=("SETUP_FAILED",)) as server:
        failed = time.monotonic() - t0
        logs = server.health()["setup"]["logs"]
        assert "ParallelError: rank 1 (pid" in logs
        assert "exited with status 1 during setup: WeightsError: weights directory /nonexistent/rank-1-weights" in logs
        assert rank_pids(server) == {}
        print(f"worker failing setup: SETUP_FAILED {failed:.1f} s after the server started")
