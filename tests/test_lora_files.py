"""Where lora_weights come from: URLs (the inputs' URL rule), data URIs and hub ids, in a cache bounded in bytes."""

import base64
import os
import time

import pytest

from flux.errors import InvalidInputError
from serving import downloads
from serving.lora_files import LoraCache
from tests.http_fixtures import LocalHTTP

ALLOW_LOOPBACK = downloads.DownloadLimits(max_bytes=1000, deadline_s=5, allow_private_addresses=True)


@pytest.fixture
def http():
    files = {f"/{n}.safetensors": (bytes([n]) * 300, "application/octet-stream") for n in range(1, 5)}
    server = LocalHTTP({**files, "/big.safetensors": (b"x" * 5000, "application/octet-stream")})
    yield server
    server.close()


def cache(tmp_path, max_total=1000, limits=ALLOW_LOOPBACK):
    return LoraCache(tmp_path / "cache", max_total, limits)


def test_a_url_is_fetched_once_and_kept(http, tmp_path):
    c = cache(tmp_path)
    a = c.resolve(f"{http.url}/1.safetensors")
    assert a.read_bytes() == bytes([1]) * 300
    assert c.resolve(f"{http.url}/1.safetensors") == a
    assert http.requested.count("/1.safetensors") == 1


def test_the_least_recently_used_files_go_first(http, tmp_path):
    c = cache(tmp_path, max_total=700)  # room for two 300-byte files
    first = c.resolve(f"{http.url}/1.safetensors")
    second = c.resolve(f"{http.url}/2.safetensors")
    os.utime(second, (time.time() - 100, time.time() - 100))
    c.resolve(f"{http.url}/1.safetensors")  # used again: now the most recent
    third = c.resolve(f"{http.url}/3.safetensors")
    assert first.exists() and third.exists() and not second.exists()
    assert sum(p.stat().st_size for p in (tmp_path / "cache").iterdir()) <= 700
    assert not list((tmp_path / "cache").glob("*.partial"))


def test_too_large_and_loopback_urls_are_refused_naming_lora_weights(http, tmp_path):
    with pytest.raises(InvalidInputError, match="^lora_weights could not be downloaded .* larger than"):
        cache(tmp_path).resolve(f"{http.url}/big.safetensors")
    public_only = downloads.DownloadLimits(max_bytes=1000, deadline_s=5)
    with pytest.raises(InvalidInputError, match="^lora_weights .*not on the public internet"):
        cache(tmp_path, limits=public_only).resolve(f"{http.url}/1.safetensors")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_data_uris(tmp_path):
    c = cache(tmp_path)
    path = c.resolve("data:application/octet-stream;base64," + base64.b64encode(b"weights").decode())
    assert path.read_bytes() == b"weights"
    with pytest.raises(InvalidInputError, match="^lora_weights could not be read: the data URI is not valid base64"):
        c.resolve("data:application/octet-stream;base64,abcde")
    with pytest.raises(InvalidInputError, match="^lora_weights is larger than 1,000 bytes"):
        c.resolve("data:application/octet-stream;base64," + "A" * 4000)


def test_hub_ids_on_an_offline_server_say_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline: nothing is sent (tests talk to loopback only).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InvalidInputError, match="^lora_weights could not be fetched from the hub repository o/n"):
        cache(tmp_path).resolve("o/n")


@pytest.mark.parametrize("value", ["file:///etc/passwd", "/etc/passwd", "ftp://example.com/x.safetensors", ""])
def test_other_values_are_refused(tmp_path, value):
    with pytest.raises(InvalidInputError, match="^lora_weights must be"):
        cache(tmp_path).resolve(value)
