"""Input files given as URLs or data URIs: fetched with a total deadline and a size cap, from the
public internet only.

Cog 0.23 fetches an http(s) input with `requests.get(url, stream=True, timeout=10)` and copies
the whole body to a temporary file: the timeout is per read, so a server that sends one byte every
few seconds holds the prediction slot forever, and the body has no size limit. A failed fetch
also leaves its empty temporary file behind. `limit_cog_downloads` replaces that step for this
process with `fetch` below: a deadline for the whole transfer, a cap on its size, and no partial
file left on any failure. It also names the input when a data URI's base64 cannot be decoded.

A URL is also a way into the network the server runs in: fetched naively, `http://169.254.169.254/`
returns the cloud's instance metadata (credentials included), and the different errors that
loopback or private addresses give (refused, timed out, an HTTP status, not an image) map what
listens there. So `fetch` connects only to addresses that `is_public_address` accepts, checked on
the addresses it actually connects to: the host name is resolved once per connection, inside the
connection, and the socket is opened to exactly the address that was checked, so a DNS answer that
changes between a check and the connection (DNS rebinding) cannot slip through. Every redirect is a
new connection and is checked the same way. A refused URL gets one message, whatever lies behind
it. Every URL input a request can make the server fetch goes through `fetch`.
"""

from __future__ import annotations

import binascii
import functools
import ipaddress
import os
import pathlib
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
import urllib3.util.connection

from flux.errors import InvalidInputError

MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
"""Largest input file accepted from a URL or a data URI (100 MiB)."""

DOWNLOAD_DEADLINE_S = 60.0
"""Most seconds an input URL may take to arrive in full, from connecting to the last byte."""

READ_TIMEOUT_S = 5.0
"""Seconds a single read of an input URL may wait for data (and, per connection, name resolution plus
connecting)."""

MAX_REDIRECTS = 10
"""Most redirects an input URL may take; each one is checked like the URL itself."""

_CHUNK = 1 << 16

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64's well-known prefix (RFC 6052): 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class DownloadLimits:
    max_bytes: int = MAX_DOWNLOAD_BYTES
    deadline_s: float = DOWNLOAD_DEADLINE_S  # from the start of name resolution to the last byte, redirects included
    # Connect to loopback, private, link-local, ... addresses too (tests, private deployments); see is_public_address.
    allow_private_addresses: bool = False

    @classmethod
    def from_env(cls) -> DownloadLimits:
        """Limits from FLUX_MAX_DOWNLOAD_BYTES / FLUX_DOWNLOAD_DEADLINE_S / FLUX_ALLOW_PRIVATE_URLS=1, else the
        defaults."""
        return cls(
            max_bytes=int(os.environ.get("FLUX_MAX_DOWNLOAD_BYTES", MAX_DOWNLOAD_BYTES)),
            deadline_s=float(os.environ.get("FLUX_DOWNLOAD_DEADLINE_S", DOWNLOAD_DEADLINE_S)),
            allow_private_addresses=os.environ.get("FLUX_ALLOW_PRIVATE_URLS", "") == "1",
        )


def is_public_address(ip: IPAddress) -> bool:
    """Whether a URL input may connect to `ip`: a globally routable unicast address.

    Refused: loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10),
    link-local (169.254/16 with the cloud metadata address, fe80::/10), multicast, unspecified,
    broadcast, documentation, benchmarking and reserved ranges, and IPv6 site-local. An IPv6
    address that carries an IPv4 one (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::a.b.c.d, 6to4
    2002:aabb:ccdd::) is judged by that IPv4 address; Teredo (2001::/32) and the other forms in ::/8
    are refused.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_site_local)
    return ip.is_global and not ip.is_multicast


class AddressRefused(Exception):
    """A URL's host does not resolve, or resolves to an address that is_public_address refuses.

    Deliberately not an OSError: urllib3 and requests pass it through untouched, so no retry or
    wrapping can turn it into a different message."""


def resolve(host: str, port: int, timeout: float | None) -> list[IPAddress]:
    """The addresses `host` resolves to, waiting at most `timeout` seconds.

    getaddrinfo has no timeout of its own (the system resolver retries for tens of seconds), so it
    runs in a daemon thread that is abandoned if it takes too long. Raises TimeoutError for a slow
    answer and AddressRefused when the name does not resolve.
    """
    answer: dict = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            family = urllib3.util.connection.allowed_gai_family()
            answer["infos"] = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            answer["error"] = e
        finally:
            done.set()

    threading.Thread(target=lookup, name="resolve", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"resolving {host} took longer than {timeout} s")
    if "error" in answer or not answer["infos"]:
        raise AddressRefused(host) from answer.get("error")
    addresses = [ipaddress.ip_address(info[4][0]) for info in answer["infos"]]
    return list(dict.fromkeys(addresses))


class _CheckedConnect:
    """urllib3 connection mixin: resolve the host once, check every address, connect only to those.

    urllib3 calls `_new_conn` for every new socket (each connection, each redirect's host); the
    stock one lets the system resolve the name again inside the connect call, after any check made
    beforehand, so the check has to live here. TLS still verifies the certificate against the
    host name (self.host), not the address."""

    allow_private: bool = False

    def _new_conn(self) -> socket.socket:
        # The connect timeout covers resolving and connecting together.
        timeout = self.timeout if isinstance(self.timeout, (int, float)) else None
        until = None if timeout is None else time.monotonic() + timeout
        try:
            addresses = resolve(self._dns_host, self.port, timeout)
        except TimeoutError as e:
            raise urllib3.exceptions.ConnectTimeoutError(self, str(e)) from e
        if not self.allow_private and not all(is_public_address(ip) for ip in addresses):
            raise AddressRefused(self.host)
        error: OSError | None = None
        for ip in addresses:
            left = None if until is None else max(until - time.monotonic(), 0.001)
            try:
                return urllib3.util.connection.create_connection(
                    (str(ip), self.port), left, self.source_address, self.socket_options
                )
            except OSError as e:
                error = e
        if isinstance(error, TimeoutError):
            raise urllib3.exceptions.ConnectTimeoutError(self, f"connecting to {self.host} timed out") from error
        raise urllib3.exceptions.NewConnectionError(self, f"Failed to establish a new connection: {error}") from error


@functools.cache
def _checked_pool_classes(allow_private: bool) -> dict[str, type]:
    """urllib3 pool classes (by scheme) whose connections are _CheckedConnect with this policy."""
    pools = {}
    for scheme, pool, conn in (
        ("http", urllib3.connectionpool.HTTPConnectionPool, urllib3.connection.HTTPConnection),
        ("https", urllib3.connectionpool.HTTPSConnectionPool, urllib3.connection.HTTPSConnection),
    ):
        checked = type(f"Checked{conn.__name__}", (_CheckedConnect, conn), {"allow_private": allow_private})
        pools[scheme] = type(f"Checked{pool.__name__}", (pool,), {"ConnectionCls": checked})
    return pools


class _CheckedAdapter(requests.adapters.HTTPAdapter):
    def __init__(self, allow_private: bool):
        self._allow_private = allow_private
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _checked_pool_classes(self._allow_private)


def _session(limits: DownloadLimits) -> requests.Session:
    """A session that connects only through _CheckedConnect. trust_env is off: no proxy from the
    environment (a proxy would resolve the name where it cannot be checked) and no ~/.netrc
    credentials sent to whatever host a client names."""
    session = requests.Session()
    session.trust_env = False
    adapter = _CheckedAdapter(limits.allow_private_addresses)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch(url: str, dest: BinaryIO, name: str, limits: DownloadLimits) -> int:
    """Stream `url` into `dest`; returns the byte count.

    Raises InvalidInputError naming `name` when the URL, or one it redirects to, is not on the
    public internet (unless `limits.allow_private_addresses`; one message for every such case,
    so that nothing about the server's network shows through), cannot be fetched, answers with an
    error status, redirects more than MAX_REDIRECTS times, is larger than `limits.max_bytes`, or
    has not arrived in full within `limits.deadline_s`. The deadline covers name resolution,
    connecting and every redirect: each connection gets at most the time that is left (and at
    most READ_TIMEOUT_S) to resolve and connect, the deadline is checked after every read, and a
    read that receives nothing gives up after READ_TIMEOUT_S, so a stalled or dripping server is
    cut off at most that long after the deadline.
    """
    start = time.monotonic()
    host = urllib.parse.urlsplit(url).netloc.rpartition("@")[2] or "the URL"
    too_slow = InvalidInputError(
        name, f"could not be downloaded from {host}: it took longer than {limits.deadline_s:g} s"
    )
    too_large = InvalidInputError(
        name, f"could not be downloaded from {host}: it is larger than {limits.max_bytes:,} bytes"
    )
    read_timeout = min(READ_TIMEOUT_S, limits.deadline_s)
    try:
        with _session(limits) as session:
            for _ in range(MAX_REDIRECTS + 1):
                left = limits.deadline_s - (time.monotonic() - start)
                if left <= 0:
                    raise too_slow
                timeout = (min(read_timeout, left), read_timeout)  # (resolve + connect, each read)
                resp = session.get(url, stream=True, allow_redirects=False, timeout=timeout)
                target = session.get_redirect_target(resp)
                if target is None:
                    break
                resp.close()
                url = urllib.parse.urljoin(resp.url, target)
            else:
                raise InvalidInputError(
                    name, f"could not be downloaded from {host}: more than {MAX_REDIRECTS} redirects"
                )
            with resp:
                if resp.status_code >= 400:
                    raise InvalidInputError(
                        name, f"could not be downloaded from {host}: HTTP {resp.status_code} {resp.reason}"
                    )
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise too_large
                total = 0
                while True:
                    # read1 returns whatever one socket read brings, so a server that drips a byte at
                    # a time cannot keep a read (and the deadline check) waiting.
                    chunk = resp.raw.read1(_CHUNK, decode_content=True)
                    if not chunk:
                        return total
                    total += len(chunk)
                    if total > limits.max_bytes:
                        raise too_large
                    dest.write(chunk)
                    if time.monotonic() - start > limits.deadline_s:
                        raise too_slow
    except AddressRefused as e:
        raise InvalidInputError(
            name, f"could not be downloaded from {host}: the URL, or one it redirects to, is not on the public internet"
        ) from e
    except (requests.Timeout, urllib3.exceptions.TimeoutError) as e:
        raise InvalidInputError(name, f"could not be downloaded from {host}: no answer for {read_timeout:g} s") from e
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise InvalidInputError(name, f"could not be downloaded from {host} ({e.__class__.__name__})") from e


def copy_limited(src: BinaryIO, dest: BinaryIO, name: str, limits: DownloadLimits) -> int:
    """Copy an already-decoded input (a data URI's bytes) into `dest`, refusing more than the cap."""
    total = 0
    while chunk := src.read(_CHUNK):
        total += len(chunk)
        if total > limits.max_bytes:
            raise InvalidInputError(name, f"is larger than {limits.max_bytes:,} bytes")
        dest.write(chunk)
    return total


FILE_INPUT_HINT = "must be an uploaded file, a data URI or an http(s) URL, not a path on the server"


def file_input(name: str, value: object) -> pathlib.Path:
    """The local file Cog made for the file input `name`, or InvalidInputError naming `name`.

    Cog fetches file inputs before the predictor runs, in threads that do not know which input a URL
    belongs to; a fetch that failed left a FailedInput (see limit_cog_downloads), and its reason is raised
    here under the input's name. A plain string is a path on this machine that the client typed, and must
    not be read.
    """
    problem = getattr(value, "failed_input_problem", None)
    if problem is not None:
        raise InvalidInputError(name, problem)
    if not isinstance(value, pathlib.Path):
        raise InvalidInputError(name, FILE_INPUT_HINT)
    return value


def limit_cog_downloads(limits: DownloadLimits | None = None) -> None:
    """Make Cog fetch file inputs of this process with `fetch`/`copy_limited` under `limits`.

    Cog hands the predictor a `cog.types.URLPath` for a URL or data URI and calls its `convert()` to
    download it before `run()`; that method is replaced here. Decoding a data URI happens earlier, when the
    request is validated. Neither knows which input it serves, so a failure does not raise there: it
    becomes a FailedInput that `file_input()` turns into an error naming the input.
    """
    import cog.types

    limits = limits or DownloadLimits.from_env()
    url_path, cog_path = cog.types.URLPath, cog.types.Path
    if not (callable(getattr(url_path, "convert", None)) and hasattr(cog_path, "validate")):
        raise RuntimeError("this cog version has no URLPath.convert / Path.validate to limit downloads with")
    original_validate = cog_path.validate.__func__

    class FailedInput(cog_path):
        """Stands in for a file input that could not be fetched or decoded; nothing exists at its path."""

    def failed(problem: str) -> cog.types.Path:
        path = FailedInput(os.devnull, "failed-input")
        path.failed_input_problem = problem
        return path

    def convert(self: cog.types.URLPath) -> cog.types.Path:
        if self._path is None:
            fd, tmp = tempfile.mkstemp(suffix=self.filename)
            try:
                with os.fdopen(fd, "wb") as dest:
                    if urllib.parse.urlsplit(self.source).scheme in ("http", "https"):
                        fetch(self.source, dest, _UNNAMED, limits)
                    else:
                        copy_limited(self.fileobj, dest, _UNNAMED, limits)
            except InvalidInputError as e:
                os.unlink(tmp)
                self._path = failed(e.problem)
            except BaseException:
                os.unlink(tmp)
                raise
            else:
                self._path = cog_path(tmp)
        return self._path

    def validate(cls: type, value: object) -> object:
        try:
            return original_validate(cls, value)
        except (binascii.Error, ValueError, OSError) as e:
            if isinstance(value, str) and value.startswith("data:"):
                return failed(f"could not be read: the data URI is not valid base64 ({e})")
            raise

    url_path.convert = convert
    cog_path.validate = classmethod(validate)


_UNNAMED = "the file input"  # fetch() names its errors; the name is put back by file_input()
