"""The real Cog server (coglet, started by script/serve as the container starts it) with the tiny
model, driven over HTTP with real image bytes: formats, validation, and every hostile input in
tests/hostile_files.py, each followed by a check that the server still answers."""

import re
import time

import pytest

from flux import images
from tests.cog_server import ROOT, data_uri, decode_output, running_server
from tests.conftest import make_image
from tests.hostile_files import CASES, encode
from tests.http_fixtures import LocalHTTP

IMAGE_BYTES = encode(make_image(300, 200), "JPEG")
IMAGE = data_uri(IMAGE_BYTES, "image/jpeg")
# The URL tests fetch from a server on loopback, which only FLUX_ALLOW_PRIVATE_URLS=1 allows.
DOWNLOAD_LIMITS = {
    "FLUX_DOWNLOAD_DEADLINE_S": "3",
    "FLUX_MAX_DOWNLOAD_BYTES": str(5 << 20),
    "FLUX_ALLOW_PRIVATE_URLS": "1",
}


@pytest.fixture(scope="module")
def http():
    server = LocalHTTP(
        {
            "/image.jpg": (IMAGE_BYTES, "image/jpeg"),
            "/page.html": (b"<html><body>hello</body></html>", "text/html"),
        }
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    with running_server(tiny_dir, tmp_path_factory.mktemp("server"), DOWNLOAD_LIMITS) as srv:
        yield srv


def edit(server, **inputs) -> dict:
    inputs = {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "seed": 1, **inputs}
    r = server.predict(inputs)
    assert r.status_code == 200, r.text
    return r.json()


def assert_failed_naming(server, body: dict, text: str) -> None:
    assert body["status"] == "failed", body.get("logs")
    assert text in body["error"], body["error"]
    assert_ready(server)


def assert_ready(server, within: float = 5.0) -> None:
    """The server is READY again (it reports BUSY for a moment after answering, as it answers 409)."""
    deadline = time.monotonic() + within
    while (status := server.health()["status"]) != "READY" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status == "READY"


@pytest.mark.parametrize("fmt,pil_format", [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")])
def test_edit_returns_an_image_in_each_format(server, fmt, pil_format):
    body = edit(server, output_format=fmt)
    assert body["status"] == "succeeded", body.get("error") or body.get("logs")
    img = decode_output(body["output"])
    assert img.format == pil_format
    assert img.size == images.kontext_size(300, 200) == (1248, 832)
    assert "Using seed: 1" in body["logs"]
    assert "Step 4/4" in body["logs"]
    assert "RANDOM" in body["logs"]
    assert re.search(r"Safety checker: passed in \d+\.\d+ s", body["logs"])


def test_fixed_aspect_ratio_and_seed_zero(server):
    body = edit(server, prompt="turn it blue", seed=0, aspect_ratio="9:16", go_fast=False)
    assert body["status"] == "succeeded", body
    assert decode_output(body["output"]).size == (800, 1328)
    assert "Using seed: 0" in body["logs"]
    assert "Transformer calls: 4 of 4" in body["logs"]


def test_taylor_seer_steps_are_marked_in_the_progress(server):
    body = edit(server, num_inference_steps=8, acceleration="go really fast")
    assert body["status"] == "succeeded", body
    assert "Step 4/8 (TaylorSeer)" in body["logs"] and "Step 3/8\n" in body["logs"]
    assert "Transformer calls: 7 of 8" in body["logs"]


@pytest.mark.parametrize(
    "inputs,field",
    [
        ({"input_image": IMAGE}, "prompt"),
        ({"prompt": "x"}, "input_image"),
        ({"prompt": "x", "input_image": IMAGE, "num_inference_steps": 100}, "num_inference_steps"),
        ({"prompt": "x", "input_image": IMAGE, "num_inference_steps": 3}, "num_inference_steps"),
        ({"prompt": "x", "input_image": IMAGE, "aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": "x", "input_image": IMAGE, "guidance": 11}, "guidance"),
        ({"prompt": "x", "input_image": IMAGE, "guidance": -0.5}, "guidance"),
        ({"prompt": "x", "input_image": IMAGE, "output_format": "gif"}, "output_format"),
        ({"prompt": "x", "input_image": IMAGE, "output_quality": 101}, "output_quality"),
        ({"prompt": "x", "input_image": IMAGE, "acceleration": "warp"}, "acceleration"),
        ({"prompt": "x", "input_image": IMAGE, "go_fast": "sometimes"}, "go_fast"),
        ({"prompt": "x", "input_image": IMAGE, "seed": "lucky"}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "seed": -2}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "seed": 2**53}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "seed": 2**63}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "seed": 2**64 + 1}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "seed": 1.5}, "seed"),
        ({"prompt": "x", "input_image": IMAGE, "disable_safety_checker": "maybe"}, "disable_safety_checker"),
    ],
)
def test_invalid_inputs_get_validation_errors(server, inputs, field):
    r = server.predict(inputs)
    assert r.status_code == 422, r.text
    assert [d["loc"] for d in r.json()["detail"]] == [["body", "input", field]]
    assert_ready(server)


@pytest.mark.parametrize(
    "inputs,loc,msg",
    [
        ({"seed": -5}, "seed", "-5 is less than the minimum of -1"),
        ({"seed": 1.5}, "seed", '1.5 is not of types "integer", "null"'),
        ({"lora_strength": [5]}, "lora_strength/0", "5 is greater than the maximum of 3"),
        ({"lora_weights": "owner/name"}, "lora_weights", '"owner/name" is not of types "array", "null"'),
        ({"mask": 5}, "mask", '5 is not of types "null", "string"'),
    ],
    ids=["seed-below-minimum", "seed-not-an-integer", "strength-item-above-maximum", "weights-not-a-list", "mask"],
)
def test_nullable_inputs_are_refused_with_the_reason(server, inputs, loc, msg):
    """A nullable input's 422 says which bound or type it broke (serving/openapi.py), as the others' do."""
    r = server.predict({"prompt": "x", "input_image": IMAGE, **inputs})
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == [{"loc": ["body", "input", loc], "msg": msg, "type": "value_error"}]
    assert_ready(server)


def test_errors_inside_the_predictor_name_the_input_in_the_form_the_docs_show(server):
    """The `error` a client reads: coglet 0.23.1 writes "Prediction failed: " twice and the exception's class
    before the message (crates/coglet-python/src/predictor.rs, predict_worker; worker_bridge.rs, predict), which
    starts with the input's name. docs/api.md quotes this very text."""
    body = edit(server, prompt="   ")
    expected = "Prediction failed: Prediction failed: InvalidInputError: prompt must be a non-empty instruction"
    assert body["status"] == "failed" and body["error"] == expected, body
    assert f"`{expected}`" in (ROOT / "docs" / "api.md").read_text()
    assert_ready(server)


def test_setup_warns_of_nothing_it_does_not_use(server):
    """No "requires torchvision" notice: diffusers imports transformers' CLIPImageProcessor and
    SiglipImageProcessor (for IP-adapters, which this server never loads); the safety checker's processors are
    the PIL ones (flux/safety.py)."""
    assert "Setup complete" in server.log_text()
    assert "torchvision" not in server.log_text()


@pytest.mark.parametrize("seed", [-1, None])
def test_seed_minus_one_or_blank_is_random(server, seed):
    inputs = {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "output_format": "png"}
    if seed is not None:
        inputs["seed"] = seed
    bodies = [server.predict(inputs).json() for _ in range(2)]
    assert [b["status"] for b in bodies] == ["succeeded"] * 2, bodies[0].get("error")
    seeds = [int(re.search(r"Using seed: (\d+)", b["logs"]).group(1)) for b in bodies]
    assert seeds[0] != seeds[1] and bodies[0]["output"] != bodies[1]["output"]


def test_the_largest_seed_is_a_seed(server):
    body = edit(server, seed=2**53 - 1)
    assert body["status"] == "succeeded", body.get("error")
    assert f"Using seed: {2**53 - 1}" in body["logs"]


def test_safety_checker_can_be_turned_off_per_request(server):
    body = edit(server, disable_safety_checker=True)
    assert body["status"] == "succeeded", body.get("error")
    assert "Safety checker: off for this prediction" in body["logs"]


@pytest.mark.parametrize(
    "prompt",
    ["mach das Auto rot, s'il vous plaît — 赤い車にして 🚗❤️", "\u200b\u202e make it red \U0001f9ea", "x" * 5000],
)
def test_unicode_emoji_and_huge_prompts_edit(server, prompt):
    body = edit(server, prompt=prompt)
    assert body["status"] == "succeeded", body.get("error")


def test_prompt_longer_than_the_text_encoder_is_truncated_with_a_warning(server):
    body = edit(server, prompt=" ".join(["red"] * 600))
    assert body["status"] == "succeeded", body.get("error")
    assert "only the first 512 are used" in body["logs"]


@pytest.mark.parametrize("name", CASES)
def test_hostile_image_files(server, name):
    case = CASES[name]
    body = edit(server, input_image=data_uri(case.build(), case.mime))
    if isinstance(case.expect, tuple):
        assert body["status"] == "succeeded", body.get("error")
        assert decode_output(body["output"]).size == images.kontext_size(*case.expect)
    else:
        assert_failed_naming(server, body, case.expect)
        assert "InvalidInputError: input_image " in body["error"]


@pytest.mark.parametrize("value", ["/etc/passwd", "../weights/README.md", "file:///etc/passwd", "predict.py"])
def test_input_image_cannot_name_a_file_on_the_server(server, value):
    body = edit(server, input_image=value)
    assert_failed_naming(server, body, "input_image must be an uploaded file, a data URI or an http(s) URL")
    assert "root:" not in body["error"] + body.get("logs", "")


@pytest.mark.parametrize(
    "value,text",
    [
        ("data:image/png;base64,abcde", "input_image could not be read: the data URI is not valid base64"),
        ("data:image/png;base64,", "input_image could not be read as an image: the file is empty"),
        ("data:,hello", "input_image could not be read as an image: unrecognised"),
        ("{http}/missing.png", "input_image could not be downloaded from 127.0.0.1:"),
        ("{http}/page.html", "input_image could not be read as an image: unrecognised"),
        ("{http}/huge.png", "input_image could not be downloaded from 127.0.0.1:"),
        ("{http}/huge-declared.png", "larger than 5,242,880 bytes"),
        ("{http}/drip.png", "took longer than 3 s"),
        ("{http}/stall.png", "no answer for 3 s"),
        ("http://127.0.0.1:9/closed-port.png", "input_image could not be downloaded from 127.0.0.1:9"),
    ],
)
def test_hostile_uris_and_urls(server, http, value, text):
    assert_failed_naming(server, edit(server, input_image=value.format(http=http.url)), text)


def test_image_from_a_url(server, http):
    body = edit(server, input_image=f"{http.url}/image.jpg")
    assert body["status"] == "succeeded", body.get("error")
    assert decode_output(body["output"]).size == (1248, 832)


def test_no_temporary_files_pile_up(server):
    """Runs after the suite above: every input Cog downloaded has been removed, and only the
    latest prediction's output directory is left."""
    before = sorted(p.name for p in server.tmpdir.iterdir())
    for _ in range(3):
        assert edit(server)["status"] == "succeeded"
        assert edit(server, input_image="data:image/png;base64,")["status"] == "failed"
    left = sorted(p for p in server.tmpdir.iterdir() if not p.name.startswith("torchinductor"))
    assert [p.name.split("-")[0] for p in left] == ["flux"], (before, left)
    assert len(list(left[0].iterdir())) == 1
