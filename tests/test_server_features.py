"""Beyond Replicate's flux-kontext-dev, through the real Cog server with the tiny model: a LoRA per request
(leaving nothing behind), several reference images in both modes, 0.25-megapixel drafts, the front-loaded
schedules, the prediction's metrics, masks and strength (with hostile masks)."""

import base64

import numpy as np
import PIL.Image
import pytest
from safetensors.torch import load_file, save_file

from flux import images
from flux.tiny import write_tiny_lora
from tests.cog_server import data_uri, decode_output, output_bytes, running_server
from tests.conftest import make_image
from tests.hostile_files import CASES, encode
from tests.http_fixtures import LocalHTTP
from tests.test_fidelity import PROXY

IMAGE = data_uri(encode(make_image(300, 200), "PNG"))
SECOND = data_uri(encode(make_image(160, 240, seed=4), "PNG"))
BASE = {"prompt": "make the car red", "input_image": IMAGE, "num_inference_steps": 4, "seed": 1, "output_format": "png"}


@pytest.fixture(scope="module")
def lora_bytes(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("lora")).read_bytes()


@pytest.fixture(scope="module")
def second_lora_bytes(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("second"), seed=2, rank=2, alpha=2.0).read_bytes()


@pytest.fixture(scope="module")
def bias_lora_bytes(tmp_path_factory):
    return write_tiny_lora(tmp_path_factory.mktemp("bias"), seed=3, bias=True).read_bytes()


def lora_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def http(lora_bytes, second_lora_bytes, bias_lora_bytes):
    server = LocalHTTP(
        {
            "/lora.safetensors": (lora_bytes, "application/octet-stream"),
            "/second.safetensors": (second_lora_bytes, "application/octet-stream"),
            "/bias.safetensors": (bias_lora_bytes, "application/octet-stream"),
        }
    )
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


@pytest.fixture(scope="module")
def never_saw_a_lora(server) -> bytes:
    """The draft edit of `server` before any LoRA reached it: every test that sends `server` a LoRA comes after
    the first test that asks for this (pytest runs a module's tests in file order, also a selection of them)."""
    return output_bytes(succeeded(server, **DRAFT))


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
    with_lora = succeeded(private_server, lora_weights=[f"{http.url}/lora.safetensors"], lora_strength=[1.0])
    after = succeeded(private_server)
    assert before == never_saw_a_lora == output_bytes(after)
    assert output_bytes(with_lora) != before
    assert "lora_load" in with_lora["metrics"]["seconds"] and "lora_unload" in after["metrics"]["seconds"]
    assert with_lora["metrics"]["loras"] == 1 and with_lora["metrics"]["lora_reused"] is False
    assert "loras" not in after["metrics"] and "lora_reused" not in after["metrics"]
    # the second use comes from the cache
    again = succeeded(private_server, lora_weights=[f"{http.url}/lora.safetensors"])  # strength 1 when left out
    assert output_bytes(again) == output_bytes(with_lora)
    assert http.requested.count("/lora.safetensors") == 1


def test_a_lora_with_biases_leaves_nothing_behind(private_server, http, never_saw_a_lora):
    """A LoRA whose layers have biases (peft's lora_bias), none, the same again, none: the images without it are
    those of a server that never saw a LoRA, and the second fuse gives the first one's image."""
    a = {"lora_weights": [f"{http.url}/bias.safetensors"], **DRAFT}
    outputs = [output_bytes(succeeded(private_server, **inputs)) for inputs in (a, DRAFT, a, DRAFT)]
    assert outputs[1] == outputs[3] == never_saw_a_lora
    assert outputs[0] == outputs[2] != never_saw_a_lora


def test_loras_that_pass_the_cache_bound_together_are_refused_saying_so(
    tiny_dir, tmp_path_factory, http, lora_bytes, second_lora_bytes, bias_lora_bytes
):
    """A LoRA cache with room for any two of the three files: a request for all three is refused with the sizes
    and the bound, and the two files it fetched first are still in the cache (not dropped for the third)."""
    sizes = [len(b) for b in (lora_bytes, second_lora_bytes, bias_lora_bytes)]
    env = {"FLUX_ALLOW_PRIVATE_URLS": "1", "FLUX_LORA_CACHE_BYTES": str(sum(sizes) - 1)}
    urls = [f"{http.url}/{name}.safetensors" for name in ("lora", "second", "bias")]
    with running_server(tiny_dir, tmp_path_factory.mktemp("small-cache"), env) as small_cache:
        fetched = [http.requested.count(f"/{name}.safetensors") for name in ("lora", "second")]
        for _ in range(2):
            error = failed(small_cache, lora_weights=urls, **DRAFT)
            total = " + ".join(f"{size:,}" for size in sizes)
            assert error.startswith(
                f"lora_weights items 1, 2 and 3 take {total} = {sum(sizes):,} bytes together, more than this "
                f"server's LoRA cache holds (FLUX_LORA_CACHE_BYTES: {sum(sizes) - 1:,} bytes)"
            ), error
        assert [http.requested.count(f"/{name}.safetensors") for name in ("lora", "second")] == [n + 1 for n in fetched]


def test_two_loras_apply_and_leave_no_trace(private_server, http):
    a, b = f"{http.url}/lora.safetensors", f"{http.url}/second.safetensors"
    plain = output_bytes(succeeded(private_server, **DRAFT))
    one = succeeded(private_server, lora_weights=[a], **DRAFT)
    two = succeeded(private_server, lora_weights=[a, b], lora_strength=[1.0, 0.5], **DRAFT)
    assert two["metrics"]["loras"] == 2 and two["metrics"]["lora_reused"] is False
    assert len({plain, output_bytes(one), output_bytes(two)}) == 3
    assert output_bytes(succeeded(private_server, **DRAFT)) == plain


def test_a_warm_lora_is_reused_and_any_order_gives_the_same_images(
    server, private_server, http, lora_bytes, second_lora_bytes
):
    """A, A, none, B, A through one server: the second A finds A still fused (nothing unfused or fused again);
    every image is byte-identical to the same request on another server, asked in another order (B, none, A)."""
    a = {"lora_weights": [f"{http.url}/lora.safetensors"], **DRAFT}
    b = {
        "lora_weights": [f"{http.url}/lora.safetensors", f"{http.url}/second.safetensors"],
        "lora_strength": [0.5, 1.0],
        **DRAFT,
    }
    bodies = [succeeded(private_server, **inputs) for inputs in (a, a, DRAFT, b, a)]
    assert [body["metrics"].get("lora_reused") for body in bodies] == [False, True, None, False, False]
    phases = [{k for k in body["metrics"]["seconds"] if k.startswith("lora")} for body in bodies]
    assert phases == [{"lora_load"}, set(), {"lora_unload"}, {"lora_load"}, {"lora_unload", "lora_load"}]
    outputs = [output_bytes(body) for body in bodies]
    assert outputs[0] == outputs[1] == outputs[4] and len(set(outputs)) == 3
    elsewhere = [
        succeeded(server, **{**b, "lora_weights": [lora_uri(lora_bytes), lora_uri(second_lora_bytes)]}),
        succeeded(server, **DRAFT),
        succeeded(server, **{**a, "lora_weights": [lora_uri(lora_bytes)]}),
    ]
    assert [output_bytes(body) for body in elsewhere] == [outputs[3], outputs[2], outputs[0]]


def test_a_lora_url_on_loopback_needs_private_urls_allowed(server, http):
    error = failed(server, lora_weights=[f"{http.url}/lora.safetensors"])
    assert error.startswith("lora_weights ") and "not on the public internet" in error


def test_a_lora_as_a_data_uri(server, lora_bytes):
    plain = output_bytes(succeeded(server))
    assert output_bytes(succeeded(server, lora_weights=[lora_uri(lora_bytes)], lora_strength=[0.5])) != plain
    assert output_bytes(succeeded(server)) == plain


def test_what_is_not_a_lora_for_this_model_is_named(server, lora_bytes, tmp_path):
    garbage = lora_uri(b"not a LoRA")
    path = tmp_path / "lora.safetensors"
    path.write_bytes(lora_bytes)
    tensors = {k: v[: v.shape[0] // 2] if k.endswith("lora_B.weight") else v for k, v in load_file(path).items()}
    save_file(tensors, path)
    wrong_shape = lora_uri(path.read_bytes())
    for value, says in [(garbage, "not a readable"), (wrong_shape, "does not fit"), ("no such thing", "must be")]:
        error = failed(server, lora_weights=[value])
        assert error.startswith("lora_weights ") and says in error, error


@pytest.mark.parametrize(
    "inputs,field",
    [
        ({"lora_weights": "https://example.com/lora.safetensors"}, "lora_weights"),  # a list, not a string
        ({"lora_weights": [1]}, "lora_weights/0"),  # coglet names an item by its JSON pointer
        ({"lora_strength": 1.0}, "lora_strength"),
        ({"lora_strength": [3.5]}, "lora_strength/0"),  # each item's bounds: serving/openapi.py
        ({"lora_strength": [1.0, -1.5]}, "lora_strength/1"),
        ({"lora_strength": ["1"]}, "lora_strength/0"),
    ],
    ids=["string", "number-item", "number", "above-maximum", "below-minimum", "string-item"],
)
def test_lora_inputs_of_the_wrong_shape_get_a_422_naming_them(server, inputs, field):
    response = server.predict({**BASE, **inputs})
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [["body", "input", field]]


def test_bad_lora_lists_are_named_with_the_item(server, lora_bytes):
    one = lora_uri(lora_bytes)
    for inputs, says in [
        ({"lora_weights": [one] * 4}, "lora_weights holds at most 3 LoRAs, got 4"),
        ({"lora_weights": [one, " "]}, "lora_weights item 2 is blank"),
        ({"lora_weights": [one, lora_uri(b"junk")]}, "lora_weights item 2 is not a readable .safetensors file"),
        ({"lora_weights": [one, "no such thing"]}, "lora_weights item 2 must be an http(s) URL"),
        ({"lora_weights": [one], "lora_strength": [1.0, 1.0]}, "lora_strength holds 2 values for 1 LoRAs"),
        ({"lora_strength": [1.0]}, "lora_strength holds 1 values for 0 LoRAs"),
    ]:
        assert failed(server, **inputs).startswith(says)


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


@pytest.mark.parametrize("value", [0.25, 1])
def test_megapixels_as_a_number_gets_a_422_naming_it(server, value):
    """A string choice, as Replicate's FLUX models take it (the README says so where it lists the inputs)."""
    response = server.predict({**BASE, "megapixels": value})
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert {tuple(d["loc"]) for d in details} == {("body", "input", "megapixels")}
    assert f'{value} is not of type "string"' in [d["msg"] for d in details]


def test_the_front_loaded_schedules_make_as_many_calls_as_their_levels(server):
    for schedule, calls in [("go fast, front-loaded", 18), ("go really fast, front-loaded", 13)]:
        body = succeeded(server, acceleration=schedule, num_inference_steps=28)
        assert body["metrics"]["transformer_calls"] == calls
        assert body["metrics"]["acceleration"] == schedule


# ---- mask and strength ---------------------------------------------------------------------------------------

DRAFT = {"megapixels": "0.25"}  # 300×200 in: 624×416 out
BOX = (75, 50, 225, 150)  # in the input's pixels: the middle quarter


def mask_uri(box=BOX, fmt="PNG", mode="L", white=255) -> str:
    mask = PIL.Image.new(mode, (300, 200), 0)
    if box:
        mask.paste(white, box)
    return data_uri(encode(mask, fmt))


def pixels(body: dict) -> np.ndarray:
    return np.asarray(decode_output(body["output"]).convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def proxy_server(tmp_path_factory):
    """The trained proxy model (tests/assets/proxy), whose VAE reconstructs images: what a masked edit leaves
    outside the mask is visible in its pixels, where the tiny model's random VAE blurs every edit over the whole
    image. It has no safety checker weights."""
    env = {"FLUX_SAFETY_CHECKER": "off"}
    with running_server(PROXY, tmp_path_factory.mktemp("proxy"), env) as srv:
        yield srv


def test_a_masked_edit_changes_only_the_masked_region(proxy_server):
    """Measured against the input's own VAE round trip (what an all-black mask returns): outside the mask the
    latents are the input's exactly (tests/test_inpaint.py), and only the VAE decoder, whose group norms and
    attention see the whole image, carries a little of the edit there."""
    unchecked = {"disable_safety_checker": True, "prompt": "make the square red", **DRAFT}
    round_trip = succeeded(proxy_server, mask=mask_uri(box=None), **unchecked)
    assert "the mask marks nothing to edit: the output is the input image through the VAE" in round_trip["logs"]
    assert round_trip["metrics"]["transformer_calls"] == 0 and round_trip["metrics"]["edited_fraction"] == 0
    masked = succeeded(proxy_server, mask=mask_uri(), **unchecked)
    plain = succeeded(proxy_server, **unchecked)
    assert masked["metrics"]["edited_fraction"] == pytest.approx(0.25, abs=0.02)
    r, m, p = pixels(round_trip), pixels(masked), pixels(plain)
    x0, y0, x1, y1 = (round(v * r.shape[1] / 300) for v in BOX)
    inside = np.zeros(r.shape[:2], bool)
    inside[y0:y1, x0:x1] = True
    outside = np.ones_like(inside)  # 16 pixels (two latent pixels) away from the mask's edge
    outside[y0 - 16 : y1 + 16, x0 - 16 : x1 + 16] = False
    masked_inside, masked_outside = np.abs(m - r)[inside].mean(), np.abs(m - r)[outside].mean()
    plain_outside = np.abs(p - r)[outside].mean()
    # Measured: 12.7 grey levels inside, 1.3 outside; the same edit without a mask changes the outside by 41.8.
    assert masked_outside < 0.25 * masked_inside and masked_outside < 0.1 * plain_outside, (
        masked_inside,
        masked_outside,
        plain_outside,
    )


def test_strength_below_one_starts_from_the_input(server):
    at_zero = succeeded(server, strength=0.0, **DRAFT)
    assert "strength 0.0 leaves no step to run" in at_zero["logs"] and at_zero["metrics"]["edited_fraction"] == 0
    assert output_bytes(at_zero) == output_bytes(succeeded(server, mask=mask_uri(box=None), **DRAFT))  # round trip
    quarter = succeeded(server, strength=0.25, **DRAFT)
    assert quarter["metrics"]["steps"] == quarter["metrics"]["transformer_calls"] == 1  # a quarter of 4 steps
    assert "Step 1/1\n" in quarter["logs"] and "Transformer calls: 1 of 1 steps" in quarter["logs"]
    full = succeeded(server, **DRAFT)
    r = pixels(at_zero)
    assert np.abs(pixels(quarter) - r).mean() < np.abs(pixels(full) - r).mean()


@pytest.mark.parametrize("name", [n for n, case in CASES.items() if isinstance(case.expect, str)])
def test_hostile_mask_files_are_named(server, name):
    case = CASES[name]
    error = failed(server, mask=data_uri(case.build(), case.mime), **DRAFT)
    assert error.startswith("mask ") and case.expect in error, error


@pytest.mark.parametrize("name", ["png_rgba", "png_16bit_grayscale", "jpeg_cmyk", "gif_animated", "one_pixel"])
def test_masks_in_other_modes_and_sizes_edit(server, name):
    case = CASES[name]
    body = succeeded(server, mask=data_uri(case.build(), case.mime), **DRAFT)
    assert decode_output(body["output"]).size == (624, 416)


@pytest.mark.parametrize("aspect_ratio", ["16:9", "1:1"])
def test_a_mask_and_strength_with_another_aspect_ratio_edit_at_its_size(server, aspect_ratio):
    body = succeeded(server, mask=mask_uri(), strength=0.75, aspect_ratio=aspect_ratio, **DRAFT)
    assert decode_output(body["output"]).size == images.output_size(aspect_ratio, 300, 200, 0.25)
    assert body["metrics"]["steps"] == 3 and body["metrics"]["edited_fraction"] == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize(
    "inputs,says",
    [
        ({"mask": "/etc/passwd"}, "mask must be an uploaded file, a data URI or an http(s) URL"),
        ({"mask": "data:image/png;base64,abcde"}, "mask could not be read: the data URI is not valid base64"),
        ({"mask": "http://127.0.0.1:9/mask.png"}, "mask could not be downloaded from 127.0.0.1:9: the URL"),
    ],
    ids=["server-path", "bad-base64", "loopback-url"],
)
def test_bad_mask_and_strength_inputs_are_named(server, inputs, says):
    assert failed(server, **inputs).startswith(says)


@pytest.mark.parametrize("value", [1.5, -0.1, "half", None])
def test_strength_out_of_range_gets_a_422_naming_it(server, value):
    response = server.predict({**BASE, "strength": value})
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [["body", "input", "strength"]]
