"""Input URLs are fetched with a total deadline and a size cap, over real HTTP, and only from the
public internet. Traffic goes to loopback addresses only: the other ranges are tested on the
address rule itself."""

import dataclasses
import io
import ipaddress
import socket
import time

import cog.types
import PIL.Image
import pytest

from flux.errors import InvalidInputError
from serving import downloads
from serving.downloads import DownloadLimits
from tests.hostile_files import encode
from tests.http_fixtures import LocalHTTP

PNG = encode(PIL.Image.new("RGB", (30, 20), (1, 2, 3)), "PNG")
# The local test server is on loopback: allowed here, refused in the tests of the address rule.
LIMITS = DownloadLimits(max_bytes=5 << 20, deadline_s=2.0, allow_private_addresses=True)
PUBLIC_ONLY = dataclasses.replace(LIMITS, allow_private_addresses=False)
REFUSED = "the URL, or one it redirects to, is not on the public internet"


@pytest.fixture(scope="module")
def http():
    server = LocalHTTP({"/image.png": (PNG, "image/png")})
    yield server
    server.close()


def fetch(url: str, limits: DownloadLimits = LIMITS) -> bytes:
    buf = io.BytesIO()
    downloads.fetch(url, buf, "input_image", limits)
    return buf.getvalue()


def test_fetches_the_whole_file(http):
    assert fetch(f"{http.url}/image.png") == PNG


@pytest.mark.parametrize(
    "path,message",
    [
        ("/missing.png", "HTTP 404"),
        ("/huge.png", "larger than 5,242,880 bytes"),
        ("/huge-declared.png", "larger than 5,242,880 bytes"),
        ("/drip.png", "took longer than 2 s"),
        ("/stall.png", "no answer for 2 s"),
    ],
)
def test_bad_urls_fail_in_time_naming_the_input(http, path, message):
    start = time.monotonic()
    with pytest.raises(InvalidInputError) as e:
        fetch(http.url + path)
    assert time.monotonic() - start < LIMITS.deadline_s + 1.5
    assert str(e.value).startswith("input_image could not be downloaded from 127.0.0.1:")
    assert message in str(e.value)


def test_unreachable_host_is_named():
    with pytest.raises(InvalidInputError, match="^input_image could not be downloaded from 127.0.0.1:9 "):
        fetch("http://127.0.0.1:9/x.png")


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("FLUX_MAX_DOWNLOAD_BYTES", "1000")
    monkeypatch.setenv("FLUX_DOWNLOAD_DEADLINE_S", "7.5")
    monkeypatch.delenv("FLUX_ALLOW_PRIVATE_URLS", raising=False)
    assert DownloadLimits.from_env() == DownloadLimits(1000, 7.5, allow_private_addresses=False)
    monkeypatch.setenv("FLUX_ALLOW_PRIVATE_URLS", "1")
    assert DownloadLimits.from_env() == DownloadLimits(1000, 7.5, allow_private_addresses=True)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.0.9",
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "172.16.5.4",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",  # shared address space (carrier NAT)
        "169.254.169.254",  # cloud instance metadata
        "169.254.0.1",
        "192.0.2.1",  # documentation
        "198.18.0.1",  # benchmarking
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%1",
        "fec0::1",
        "fc00::1",
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "ff02::1",
        "2001:db8::1",
        "2001::1",  # Teredo
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b::7f00:1",
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not downloads.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "151.101.1.140", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
def test_public_addresses_are_allowed(address):
    assert downloads.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "path", ["/image.png", "/missing.png", "/stall.png", "/redirect?to=http://example.com/", "/nothing-there"]
)
def test_loopback_urls_are_refused_before_connecting_with_one_message(http, path):
    port = http.url.rsplit(":", 1)[1]
    for url in (http.url + path, f"http://localhost:{port}{path}", "http://127.0.0.1:9/closed-port.png"):
        before = len(http.requested)
        start = time.monotonic()
        with pytest.raises(InvalidInputError) as e:
            fetch(url, PUBLIC_ONLY)
        host = url.split("/")[2]
        assert str(e.value) == f"input_image could not be downloaded from {host}: {REFUSED}"
        assert time.monotonic() - start < 1.0
        assert len(http.requested) == before  # nothing reached the server


@pytest.fixture
def only_127_0_0_1_is_public(monkeypatch):
    """The address rule with 127.0.0.1 counted as public, so that a redirect from it to another
    loopback address (127.0.0.2, where nothing listens) shows the rule applied after a redirect."""
    monkeypatch.setattr(downloads, "is_public_address", lambda ip: ip == ipaddress.ip_address("127.0.0.1"))


def test_every_redirect_is_checked(http, only_127_0_0_1_is_public):
    port = http.url.rsplit(":", 1)[1]
    assert fetch(f"{http.url}/redirect?to=/image.png", PUBLIC_ONLY) == PNG
    for target in (f"http://127.0.0.2:{port}/image.png", f"http://[::1]:{port}/image.png"):
        with pytest.raises(InvalidInputError) as e:
            fetch(f"{http.url}/redirect?to={target}", PUBLIC_ONLY)
        assert str(e.value) == f"input_image could not be downloaded from 127.0.0.1:{port}: {REFUSED}"


def test_redirect_loops_end(http):
    with pytest.raises(InvalidInputError, match="more than 10 redirects"):
        fetch(f"{http.url}/redirect", LIMITS)


@pytest.fixture
def fake_dns(monkeypatch):
    """getaddrinfo answers for made-up names from `answers` ({name: [address, ...] per call, or a
    number of seconds to hang}); other names resolve as usual. Returns (answers, calls)."""
    real = socket.getaddrinfo
    answers: dict = {}
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        calls.append(host)
        answer = answers[host]
        if isinstance(answer, (int, float)):
            time.sleep(answer)
            raise socket.gaierror(socket.EAI_AGAIN, "timed out")
        if not answer:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        address = answer.pop(0) if len(answer) > 1 else answer[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers, calls


def test_connects_to_the_address_it_checked(http, fake_dns, only_127_0_0_1_is_public):
    """A name that resolves to an allowed address and then to another one (DNS rebinding) is
    connected to at the address that was checked: resolved once per connection, never again."""
    answers, calls = fake_dns
    answers["rebind.test"] = ["127.0.0.1", "127.0.0.2"]
    port = http.url.rsplit(":", 1)[1]
    assert fetch(f"http://rebind.test:{port}/image.png", PUBLIC_ONLY) == PNG
    assert calls == ["rebind.test"]
    # The second answer is refused like any other.
    with pytest.raises(InvalidInputError, match=REFUSED):
        fetch(f"http://rebind.test:{port}/image.png", PUBLIC_ONLY)


def test_a_name_that_does_not_resolve_gets_the_same_message(fake_dns):
    answers, _ = fake_dns
    answers["nowhere.test"] = []
    for limits in (PUBLIC_ONLY, LIMITS):
        with pytest.raises(
            InvalidInputError, match=f"^input_image could not be downloaded from nowhere.test: {REFUSED}"
        ):
            fetch("http://nowhere.test/x.png", limits)


def test_name_resolution_counts_against_the_deadline(fake_dns):
    answers, _ = fake_dns
    answers["slow.test"] = 10
    limits = dataclasses.replace(LIMITS, deadline_s=1.0)
    start = time.monotonic()
    with pytest.raises(InvalidInputError, match="^input_image could not be downloaded from slow.test: no answer"):
        fetch("http://slow.test/x.png", limits)
    assert time.monotonic() - start < 1.5


@pytest.fixture
def limited_cog(monkeypatch):
    """cog.types with this process's downloads limited; restored afterwards."""
    monkeypatch.setattr(cog.types.URLPath, "convert", cog.types.URLPath.convert)
    monkeypatch.setattr(cog.types.Path, "validate", cog.types.Path.validate)
    downloads.limit_cog_downloads(LIMITS)
    return cog.types


def test_cog_url_inputs_download_through_the_limits(http, limited_cog, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    path = limited_cog.Path.validate(f"{http.url}/image.png").convert()
    assert path.read_bytes() == PNG
    path.unlink()
    # A failed fetch does not know its input's name: it stands in for the file until the predictor names it.
    failed = limited_cog.Path.validate(f"{http.url}/huge.png").convert()
    assert list(tmp_path.iterdir()) == []  # nothing left behind by the failed download
    for name in ("input_image", "input_images"):
        with pytest.raises(InvalidInputError, match=f"^{name} could not be downloaded .* larger than"):
            downloads.file_input(name, failed)


def test_cog_data_uris_are_capped_and_bad_base64_is_named(limited_cog):
    small = limited_cog.Path.validate("data:image/png;base64,iVBORw0KGgo=").convert()
    assert small.read_bytes() == b"\x89PNG\r\n\x1a\n"
    small.unlink()
    bad = limited_cog.Path.validate("data:image/png;base64,abcde")
    with pytest.raises(InvalidInputError, match="^input_images could not be read: the data URI is not valid base64"):
        downloads.file_input("input_images", bad)
    big = limited_cog.Path.validate("data:image/png;base64," + "A" * (8 << 20)).convert()
    with pytest.raises(InvalidInputError, match="^input_image is larger than 5,242,880 bytes"):
        downloads.file_input("input_image", big)


def test_a_plain_string_is_not_a_file_input():
    with pytest.raises(InvalidInputError, match="^input_image must be an uploaded file"):
        downloads.file_input("input_image", "/etc/passwd")
