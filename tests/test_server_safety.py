"""Replicate's safety contract through the real Cog server: a flagged image fails the prediction
and never reaches the output directory; the checker's weights are required unless the server is
started without a checker; input URLs on the server's own network are refused unless
FLUX_ALLOW_PRIVATE_URLS=1 (the other server tests set it)."""

import shutil

import pytest

from flux import safety
from flux.tiny import write_tiny_safety_checkers
from tests.cog_server import data_uri, decode_output, running_server
from tests.conftest import make_image
from tests.hostile_files import encode
from tests.http_fixtures import LocalHTTP

IMAGE_BYTES = encode(make_image(300, 200), "PNG")
EDIT = {"prompt": "make the car red", "input_image": data_uri(IMAGE_BYTES), "num_inference_steps": 4, "seed": 3}
# No test here may reach the hub: a missing checker must fail, not download.
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def output_files(server) -> set[str]:
    """Every file under the server's TMPDIR except compile caches."""
    return {
        str(p.relative_to(server.tmpdir))
        for p in server.tmpdir.rglob("*")
        if p.is_file() and not p.relative_to(server.tmpdir).parts[0].startswith("torchinductor")
    }


@pytest.fixture(scope="module")
def flagging_server(tiny_dir, tmp_path_factory):
    """The tiny model with checkers that flag every image (both stages), private URLs refused."""
    workdir = tmp_path_factory.mktemp("flagging")
    weights = workdir / "weights"
    shutil.copytree(tiny_dir, weights)
    write_tiny_safety_checkers(weights, concept_flags=True, classifier_flags=True)
    with running_server(weights, workdir, OFFLINE) as server:
        yield server


@pytest.fixture(scope="module")
def http():
    server = LocalHTTP({"/image.png": (IMAGE_BYTES, "image/png")})
    yield server
    server.close()


def test_a_flagged_image_fails_the_prediction_and_is_never_written(flagging_server):
    server = flagging_server
    allowed = server.predict({**EDIT, "disable_safety_checker": True}).json()
    assert allowed["status"] == "succeeded", allowed.get("error")
    assert "Safety checker: off for this prediction" in allowed["logs"]
    before = output_files(server)
    assert len(before) == 1  # the image that was returned

    body = server.predict(EDIT).json()
    assert body["status"] == "failed"
    assert body["error"].endswith(
        "UnsafeOutputError: the edited image was flagged as NSFW by the safety checker and is not returned; "
        "try again with a different prompt or seed"
    )
    # A failed prediction's answer carries no logs (coglet 0.23); the server's own log has them.
    logged = [message for _, message in server.log_lines(body["id"])]
    flagged = "Safety checker: flagged by the concept checker and by the NSFW classifier (nsfw 1.00) in "
    assert any(message.startswith(flagged) for message in logged), logged
    assert not body.get("output")
    assert output_files(server) == before


def test_a_loopback_url_is_refused_without_being_fetched(flagging_server, http):
    body = flagging_server.predict({**EDIT, "input_image": f"{http.url}/image.png"}).json()
    assert body["status"] == "failed"
    host = http.url.split("/")[2]
    assert body["error"].endswith(
        f"input_image could not be downloaded from {host}: "
        "the URL, or one it redirects to, is not on the public internet"
    )
    assert http.requested == []


@pytest.fixture(scope="module")
def weights_without_checkers(tiny_dir, tmp_path_factory):
    weights = tmp_path_factory.mktemp("no-checkers") / "weights"
    shutil.copytree(tiny_dir, weights)
    for folder in safety.CHECKER_FOLDERS:
        shutil.rmtree(weights / folder)
    return weights


def test_setup_fails_without_checker_weights_or_network(weights_without_checkers, tmp_path):
    with running_server(weights_without_checkers, tmp_path, OFFLINE, wait_for=("SETUP_FAILED",)) as server:
        logs = server.health()["setup"]["logs"]
        assert "WeightsError: the safety checker's safety_checker/, feature_extractor/ are not in" in logs
        assert "FLUX_SAFETY_CHECKER=off" in logs
    assert sorted(p.name for p in weights_without_checkers.iterdir() if p.name.startswith(".")) == []


def test_a_server_without_a_checker_serves_only_requests_that_turn_it_off(weights_without_checkers, tmp_path):
    env = {**OFFLINE, "FLUX_SAFETY_CHECKER": "off"}
    with running_server(weights_without_checkers, tmp_path, env) as server:
        body = server.predict(EDIT).json()
        assert body["status"] == "failed"
        assert body["error"].endswith(
            "InvalidInputError: disable_safety_checker must be true on this server: "
            "it runs without a safety checker (FLUX_SAFETY_CHECKER=off)"
        )
        assert "Step 1/" not in body["logs"]  # refused before editing
        body = server.predict({**EDIT, "disable_safety_checker": True}).json()
        assert body["status"] == "succeeded", body.get("error")
        assert decode_output(body["output"]).size == (1248, 832)
