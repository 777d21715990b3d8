"""Input URLs are fetched with a total deadline and a size cap, over real HTTP."""

import io
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
LIMITS = DownloadLimits(max_bytes=5 << 20, deadline_s=2.0)


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
    assert DownloadLimits.from_env() == DownloadLimits(1000, 7.5)


@pytest.fixture
def limited_cog(monkeypatch):
    """cog.types with this process's downloads limited; restored afterwards."""
    monkeypatch.setattr(cog.types.URLPath, "convert", cog.types.URLPath.convert)
    monkeypatch.setattr(cog.types.Path, "validate", cog.types.Path.validate)
    downloads.limit_cog_downloads("input_image", LIMITS)
    return cog.types


def test_cog_url_inputs_download_through_the_limits(http, limited_cog, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    path = limited_cog.Path.validate(f"{http.url}/image.png").convert()
    assert path.read_bytes() == PNG
    path.unlink()
    with pytest.raises(InvalidInputError, match="larger than"):
        limited_cog.Path.validate(f"{http.url}/huge.png").convert()
    assert list(tmp_path.iterdir()) == []  # nothing left behind by the failed download


def test_cog_data_uris_are_capped_and_bad_base64_is_named(limited_cog):
    small = limited_cog.Path.validate("data:image/png;base64,iVBORw0KGgo=").convert()
    assert small.read_bytes() == b"\x89PNG\r\n\x1a\n"
    small.unlink()
    with pytest.raises(InvalidInputError, match="^input_image could not be read: the data URI is not valid base64"):
        limited_cog.Path.validate("data:image/png;base64,abcde")
    big = "data:image/png;base64," + "A" * (8 << 20)
    with pytest.raises(InvalidInputError, match="^input_image is larger than 5,242,880 bytes"):
        limited_cog.Path.validate(big).convert()
