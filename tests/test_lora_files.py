"""Where lora_weights come from: URLs (the inputs' URL rule), data URIs and hub ids, in a cache bounded in bytes."""

import base64
import hashlib
import logging
import os
import time

import pytest

from flux.errors import InvalidInputError
from serving import downloads, lora_files
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
    a = c.resolve(f"{http.url}/1.safetensors").path
    assert a.read_bytes() == bytes([1]) * 300
    assert c.resolve(f"{http.url}/1.safetensors").path == a
    assert http.requested.count("/1.safetensors") == 1


def test_the_least_recently_used_files_go_first(http, tmp_path):
    c = cache(tmp_path, max_total=700)  # room for two 300-byte files
    first = c.resolve(f"{http.url}/1.safetensors").path
    second = c.resolve(f"{http.url}/2.safetensors").path
    os.utime(second, (time.time() - 100, time.time() - 100))
    c.resolve(f"{http.url}/1.safetensors")  # used again: now the most recent
    third = c.resolve(f"{http.url}/3.safetensors").path
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
    path = c.resolve("data:application/octet-stream;base64," + base64.b64encode(b"weights").decode()).path
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
    with pytest.raises(InvalidInputError, match="^lora_weights (must be|is blank)"):
        cache(tmp_path).resolve(value)


def test_a_request_keeps_its_own_files_and_older_ones_go(http, tmp_path):
    c = cache(tmp_path, max_total=1000)  # room for three 300-byte files
    old = c.resolve(f"{http.url}/1.safetensors").path
    files = c.resolve_all([f"{http.url}/{n}.safetensors" for n in (2, 3, 4)])
    assert all(f.path.exists() for f in files) and not old.exists()
    assert [f.path.read_bytes() for f in files] == [bytes([n]) * 300 for n in (2, 3, 4)]


def test_a_request_whose_files_pass_the_cache_bound_is_refused_saying_so(http, tmp_path):
    c = cache(tmp_path, max_total=700)
    urls = [f"{http.url}/{n}.safetensors" for n in (1, 2, 3)]
    says = (
        "^lora_weights items 1, 2 and 3 take 300 \\+ 300 \\+ 300 = 900 bytes together, more than this server's "
        "LoRA cache holds \\(FLUX_LORA_CACHE_BYTES: 700 bytes\\)$"
    )
    with pytest.raises(InvalidInputError, match=says) as refused:
        c.resolve_all(urls)
    assert type(refused.value) is InvalidInputError  # its name is what the client reads before the message
    c.resolve_all(urls[:2])  # both still in the cache: only the file that did not fit was left out
    assert http.requested.count("/1.safetensors") == http.requested.count("/2.safetensors") == 1
    assert not list((tmp_path / "cache").glob("*.partial"))
    with pytest.raises(InvalidInputError, match="^lora_weights takes 300 bytes, more than this server's LoRA cache"):
        cache(tmp_path / "small", max_total=200).resolve_all(urls[:1])


def test_items_of_a_request_are_named(http, tmp_path):
    one = f"{http.url}/1.safetensors"
    for sources, says in [
        ([one, " "], "^lora_weights item 2 is blank"),
        ([one, 1], "^lora_weights item 2 is blank"),
        ([one, "no such thing"], "^lora_weights item 2 must be an http"),
        (["no such thing"], "^lora_weights must be an http"),
    ]:
        with pytest.raises(InvalidInputError, match=says):
            cache(tmp_path).resolve_all(sources)


def test_the_cache_hands_over_the_digest_of_what_it_wrote(http, tmp_path, monkeypatch):
    hashed = []
    real = lora_files.file_sha256
    monkeypatch.setattr(lora_files, "file_sha256", lambda path: hashed.append(path) or real(path))
    c = cache(tmp_path, max_total=300)
    url = f"{http.url}/1.safetensors"
    first = c.resolve(url)
    assert first.sha256 == hashlib.sha256(bytes([1]) * 300).hexdigest()
    assert c.resolve(url) == first and hashed == []  # computed while writing; a hit reads nothing
    restarted = cache(tmp_path, max_total=300)
    assert restarted.resolve(url) == first and hashed == [first.path]  # a file from before: read once
    assert restarted.resolve(url) == first and len(hashed) == 1
    c.resolve(f"{http.url}/2.safetensors")  # room for one file: the first goes
    http.files["/1.safetensors"] = (bytes([5]) * 300, "application/octet-stream")  # the URL now serves other bytes
    again = c.resolve(url)
    assert again.path == first.path and again.sha256 == hashlib.sha256(bytes([5]) * 300).hexdigest()


def test_the_default_bound_holds_a_full_request_of_the_largest_files(monkeypatch, caplog):
    monkeypatch.delenv("FLUX_LORA_CACHE_BYTES", raising=False)
    monkeypatch.setenv("FLUX_MAX_LORA_BYTES", "1000")
    assert LoraCache.from_env().max_total_bytes == 3000
    monkeypatch.setenv("FLUX_LORA_CACHE_BYTES", "2500")
    with caplog.at_level(logging.WARNING, logger="serving.lora_files"):
        assert LoraCache.from_env().max_total_bytes == 2500
    assert "FLUX_LORA_CACHE_BYTES (2,500) holds fewer than 3 LoRAs of FLUX_MAX_LORA_BYTES (1,000)" in caplog.text
