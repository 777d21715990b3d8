"""Beyond Replicate's flux-kontext-dev, through the real Cog server with the tiny model: a LoRA per request
(leaving nothing behind), several reference images in both modes, 0.25-megapixel drafts, the front-loaded
schedules, and the prediction's metrics."""

import base64

import pytest
from safetensors.torch import load_file, save_file

from flux import images
from tests.cog_server import data_uri, decode_output, output_bytes, running_server
from tests.conftest import make_image
from tests.hostile_files import encode
from tests.http_fixtures import LocalHTTP
from tests.lora_files import write_tiny_lora

IMAGE = data_uri(encode(make_image(300, 200), "PNG"))
SECOND = data_uri(encode(make_image(160, 240, seed=4), "PNG"))
BASE = {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "seed": 1, "output_format": "png"}


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("lora")).read_bytes()


@pytest.fixture(scope="module")
def http(lora_bytes):
    server = LocalHTTP({"/lora.safetensors": (lora_bytes, "application/octet-stream")})
    yield server
    server.close()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """A server as deployed: URL inputs reach only the public internet."""
    with running_server(tiny_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def private_server(tiny_dir, tmp_path_factory):
    """A server for a private deployment, where URLs on loopback are allowed."""
    with running_server(tiny_dir, tmp_path_factory.mktemp("private"), {"FLUX_ALLOW_PRIVATE_URLS": "1"}) as srv:
        yield srv


def predict(server, **inputs) -> dict:
    response = server.predict({**BASE, **inputs})
    assert response.status_code == 200, response.text
    return response.json()


def succeeded(server, **inputs) -> dict:
    body = predict(server, **inputs)
    assert body["status"] == "succeeded", (body.get("error"), body.get("logs", "")[-2000:])
    return body


def failed(server, **inputs) -> str:
    body = predict(server, **inputs)
    assert body["status"] == "failed", body.get("logs", "")[-2000:]
    return body["error"].split("InvalidInputError: ", 1)[-1]  # coglet puts its own words before ours


def test_metrics_are_in_the_prediction(server):
    body = succeeded(server)
    metrics = body["metrics"]
    assert metrics["transformer_calls"] == 4 and metrics["steps"] == 4  # go really fast at 4 steps: all protected
    assert metrics["seed"] == 1 and metrics["acceleration"] == "go really fast"
    assert metrics["context_tokens"] == 1248 * 832 // 256  # 3:2 input, snapped to a Kontext resolution
    assert {"text", "image", "denoise", "decode", "safety"} <= set(metrics["seconds"])
    assert all(v >= 0 for v in metrics["seconds"].values())
    assert succeeded(server, num_inference_steps=28)["metrics"]["transformer_calls"] == 13


def test_a_lora_changes_the_image_and_leaks_into_nothing_after_it(server, private_server, http):
    never_saw_a_lora = output_bytes(succeeded(server))
    before = output_bytes(succeeded(private_server))
    with_lora = succeeded(private_server, lora_weights=f"{http.url}/lora.safetensors", lora_strength=1.0)
    after = output_bytes(succeeded(private_server))
    assert before == never_saw_a_lora == after
    assert output_bytes(with_lora) != before
    assert {"lora_load", "lora_unload"} <= set(with_lora["metrics"]["seconds"])
    # the second use comes from the cache
    again = succeeded(private_server, lora_weights=f"{http.url}/lora.safetensors", lora_strength=1.0)
    assert output_bytes(again) == output_bytes(with_lora)
    assert http.requested.count("/lora.safetensors") == 1


def test_a_lora_url_on_loopback_needs_private_urls_allowed(server, http):
    error = failed(server, lora_weights=f"{http.url}/lora.safetensors")
    assert error.startswith("lora_weights ") and "not on the public internet" in error


def test_a_lora_as_a_data_uri(server, lora_bytes):
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora_bytes).decode()
    plain = output_bytes(succeeded(server))
    assert output_bytes(succeeded(server, lora_weights=uri, lora_strength=0.5)) != plain
    assert output_bytes(succeeded(server)) == plain


def test_what_is_not_a_lora_for_this_model_is_named(server, lora_bytes, tmp_path):
    garbage = "data:application/octet-stream;base64," + base64.b64encode(b"not a LoRA").decode()
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora_bytes)
    tensors = {k: v[: v.shape[0] // 2] if k.endswith("lora_B.weight") else v for k, v in load_file(path).items()}
    save_file(tensors, path)
    wrong_shape = "data:application/octet-stream;base64," + base64.b64encode(path.read_bytes()).decode()
    for value, says in [(garbage, "not a readable"), (wrong_shape, "does not fit"), ("no such thing", "must be")]:
        error = failed(server, lora_weights=value)
        assert error.startswith("lora_weights ") and says in error, error


@pytest.mark.parametrize("mode", ["stitch", "separate"])
def test_two_images_in_each_mode(server, mode):
    one = succeeded(server)
    two = succeeded(server, input_images=[SECOND], multi_image_mode=mode)
    assert decode_output(two["output"]).size == decode_output(one["output"]).size  # follows input_image
    assert output_bytes(two) != output_bytes(one)
    if mode == "stitch":  # 300×200 and 160×240 resized to height 200: 433×200, snapped
        w, h = images.kontext_size(300 + round(160 * 200 / 240), 200)
        assert two["metrics"]["context_tokens"] == w * h // 256
    else:  # each its own tokens: two ~1 MP images, within two megapixels
        assert two["metrics"]["context_tokens"] == sum(
            w * h // 256 for w, h in (images.kontext_size(300, 200), images.kontext_size(160, 240))
        )


def test_bad_reference_images_are_named(server):
    error = failed(server, input_images=["data:image/png;base64,abcde"])
    assert error.startswith("input_images could not be read"), error
    error = failed(server, input_images=[data_uri(b"not an image at all")])
    assert error.startswith("input_images could not be read as an image"), error
    error = failed(server, input_images=[SECOND] * 5)
    assert error.startswith("input_images holds at most 4"), error


@pytest.mark.parametrize("aspect_ratio", ["match_input_image", "16:9"])
def test_a_quarter_megapixel_halves_the_sizes(server, aspect_ratio):
    body = succeeded(server, megapixels="0.25", aspect_ratio=aspect_ratio)
    full = images.output_size(aspect_ratio, 300, 200)
    assert decode_output(body["output"]).size == images.scale_size(full, 0.25)
    assert body["metrics"]["context_tokens"] == 624 * 416 // 256


def test_the_front_loaded_schedules_make_as_many_calls_as_their_levels(server):
    for schedule, calls in [("go fast, front-loaded", 18), ("go really fast, front-loaded", 13)]:
        body = succeeded(server, acceleration=schedule, num_inference_steps=28)
        assert body["metrics"]["transformer_calls"] == calls
        assert body["metrics"]["acceleration"] == schedule
