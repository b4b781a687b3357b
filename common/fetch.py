"""Fetching image bytes by URI, safely: size caps everywhere, and no requests into private networks.

A dataset is user input, and its image URLs are requests the worker makes from inside the cluster.
Without a guard, "http://169.254.169.254/latest/meta-data/iam/..." would hand cloud credentials to
whoever can submit a CSV (server-side request forgery). So for http(s) the fetcher resolves the
host itself, refuses private, loopback, link-local, multicast, reserved and unspecified addresses
(unless ``allow_private_networks``), and then connects to exactly the address it checked: letting
the HTTP library resolve the name again would let a DNS answer change in between (DNS rebinding).
Redirects are followed by hand so that every hop is checked the same way.

Schemes: ``http(s)://``; ``s3://`` through ``common.storage``, only from the policy's S3 sources
(``common.s3_sources``: the worker's credentials reach more buckets than a dataset's author should);
``file://`` and absolute paths only inside the policy's ``file_roots`` (``common.local_files`` says
how, and why a dataset must not be a way to read the disk of the machine processing it). Neither
reads the results store: one batch's outputs are never another's inputs. Relative paths are
refused here: the producer makes them absolute against the dataset's folder.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import DecodeError, HTTPError, NewConnectionError, SSLError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatchError

from common.errors import (
    ImageError,
    ImageFetchRefusedError,
    ImageFetchTransientError,
    ImageTooLargeError,
    NotFoundError,
    ObjectTooLargeError,
)
from common.local_files import FileRoots
from common.s3_sources import S3Sources
from common.settings import STORAGE_RETRY_SECONDS, Settings
from common.storage import read_uri
from common.storage.uri import file_uri_path, uri_scheme

__all__ = [
    "DefaultFetcher",
    "FetchPolicy",
    "ImageFetcher",
    "MemoryFetcher",
    "address_refusal",
    "content_sha256",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_HEADERS = {
    "User-Agent": "vitscope-image-fetcher",
    "Accept": "image/*,*/*;q=0.5",
    # Images are compressed already; asking for identity also keeps gzip bombs out of the picture.
    "Accept-Encoding": "identity",
}


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one fetch. ``timeout_seconds`` bounds the whole fetch, redirects included;
    ``file_roots`` are the only folders local files are read from (none by default), and
    ``allow_hard_links`` whether a file there may have other names; ``s3_sources`` the buckets or
    bucket/prefixes S3 objects are read from (``None``: the results store's bucket, see
    ``common.s3_sources``); ``results_url`` where results are stored, never read as an input."""

    max_bytes: int = 50 * 1024 * 1024
    timeout_seconds: float = 30.0
    allow_private_networks: bool = False
    max_redirects: int = 5
    file_roots: tuple[Path, ...] = ()
    allow_hard_links: bool = False
    s3_sources: tuple[str, ...] | None = None
    results_url: str | None = None
    storage_retry_seconds: float = STORAGE_RETRY_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings, *, results_url: str | None = None) -> FetchPolicy:
        """The settings' limits; ``results_url`` is the store actually written to (default: the
        settings' storage URL)."""
        return cls(
            max_bytes=settings.max_image_bytes,
            timeout_seconds=settings.fetch_timeout_seconds,
            allow_private_networks=settings.allow_private_networks,
            file_roots=tuple(settings.file_roots),
            allow_hard_links=settings.allow_hard_links,
            s3_sources=None if settings.s3_sources is None else tuple(settings.s3_sources),
            results_url=results_url or settings.resolved_storage_url(),
            storage_retry_seconds=settings.storage_retry_seconds,
        )


class ImageFetcher(Protocol):
    """Turns an image URI into its bytes; raises ``ImageError`` subclasses or transient errors."""

    def fetch(self, uri: str) -> bytes: ...


def content_sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data``: an image's identity in storage keys, whatever URI it came from."""
    return hashlib.sha256(data).hexdigest()


def address_refusal(address: str | IPAddress) -> str | None:
    """Why a connection to ``address`` is refused by default, or ``None`` for a public address.

    IPv4 addresses embedded in IPv6 ones (``::ffff:10.0.0.1``, 6to4 ``2002:0a00:0001::``) are judged
    by the IPv4 address they carry, since that is where the packets end up. The final
    ``is_global`` test catches ranges that are neither private nor public, such as the carrier-grade
    NAT block 100.64.0.0/10.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            ip = embedded
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


class MemoryFetcher:
    """Images from a dictionary {uri: bytes}, for tests and dry runs."""

    def __init__(self, images: Mapping[str, bytes]) -> None:
        self._images = dict(images)

    def fetch(self, uri: str) -> bytes:
        try:
            return self._images[uri]
        except KeyError:
            raise ImageError(f"no such image: {uri}") from None


@dataclass(frozen=True)
class _HttpTarget:
    """One http(s) URL taken apart for a request to an address we chose ourselves."""

    url: str
    scheme: str
    host: str  # ASCII (IDNA) host name or IP literal, without brackets
    port: int
    request_path: str  # path and query, percent-encoded

    @classmethod
    def parse(cls, url: str) -> _HttpTarget:
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise ImageError(f"invalid URL {url!r}: {exc}") from exc
        if not host:
            raise ImageError(f"invalid URL {url!r}: no host")
        # Keep existing %-escapes and reserved characters; encode spaces and the like, which
        # http.client would otherwise refuse to send.
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=?~")
        return cls(url=url, scheme=parts.scheme.lower(), host=host, port=port, request_path=path)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        return host if self.port == default_port else f"{host}:{self.port}"


class DefaultFetcher:
    """The real fetcher: http(s) with the network policy, s3/file through ``common.storage``.

    Thread-safe and stateless between fetches (every fetch opens its own connection), so one
    instance serves all of a worker's download threads.
    """

    def __init__(self, policy: FetchPolicy = FetchPolicy()) -> None:
        self.policy = policy
        self._file_roots = FileRoots(policy.file_roots, allow_hard_links=policy.allow_hard_links)
        self._s3_sources = S3Sources(policy.s3_sources, results_url=policy.results_url)
        self._results_folder = _local_folder(policy.results_url)

    def with_file_roots(self, roots: tuple[Path, ...]) -> DefaultFetcher:
        """The same fetcher reading local files from ``roots`` instead (the local runner's default)."""
        return DefaultFetcher(replace(self.policy, file_roots=roots))

    def fetch(self, uri: str) -> bytes:
        scheme = uri_scheme(uri)
        if scheme in ("http", "https"):
            return self._fetch_http(uri)
        if scheme == "s3":
            return self._read_stored(uri)
        if scheme == "file":
            try:
                path = file_uri_path(uri)
            except ValueError as exc:  # e.g. file://otherhost/x
                raise ImageFetchRefusedError(str(exc)) from exc
            return self._read_local(uri, path)
        if scheme == "" and uri:
            if not os.path.isabs(uri):
                raise ImageError(f"relative image path {uri!r}: resolve it against the dataset's folder")
            return self._read_local(uri, Path(uri))
        raise ImageFetchRefusedError(
            f"cannot fetch {uri!r}: supported are http(s)://, s3://, file:// and absolute paths"
        )

    def _read_local(self, uri: str, path: Path) -> bytes:
        """Checked against the file roots and the results folder first: a refused path is never opened."""
        checked = self._file_roots.check(uri, path)
        results = self._results_folder
        if results is not None and (checked.path == results or results in checked.path.parents):
            raise ImageFetchRefusedError(
                f"{uri} lies in the results store: the outputs of batches are never read as inputs"
            )
        return self._file_roots.read(checked, max_bytes=self.policy.max_bytes)

    def _read_stored(self, uri: str) -> bytes:
        """An ``s3://`` object, read only from the allowed sources (``common.s3_sources``)."""
        self._s3_sources.check(uri)
        try:
            return read_uri(
                uri, max_bytes=self.policy.max_bytes, retry_seconds=self.policy.storage_retry_seconds
            )
        except ObjectTooLargeError as exc:
            raise ImageTooLargeError(str(exc)) from exc
        except NotFoundError as exc:
            raise ImageError(str(exc)) from exc
        except ValueError as exc:  # e.g. s3://bucket without a key
            raise ImageFetchRefusedError(str(exc)) from exc

    def _fetch_http(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.policy.timeout_seconds
        url = uri
        for _ in range(self.policy.max_redirects + 1):
            target = _HttpTarget.parse(url)
            with self._request(target, deadline) as response:
                status = response.status
                if status not in _REDIRECT_STATUSES:
                    _check_status(status, url)
                    return self._read_body(response, url, deadline)
                location = response.headers.get("Location")
            if not location:
                raise ImageError(f"HTTP {status} without a Location header for {url}")
            next_url = urljoin(url, location)
            if uri_scheme(next_url) not in ("http", "https"):
                raise ImageFetchRefusedError(f"{url} redirects to {next_url!r}: only http(s) is followed")
            url = next_url
        raise ImageError(f"more than {self.policy.max_redirects} redirects fetching {uri}")

    @contextmanager
    def _request(self, target: _HttpTarget, deadline: float) -> Iterator[urllib3.BaseHTTPResponse]:
        """GET ``target`` from the first of its checked addresses that accepts a connection.

        Trying each address in turn matters for dual-stack hosts on machines without an IPv6
        route, where the first (IPv6) address fails at once and the IPv4 one works.
        """
        addresses = self._checked_addresses(target)
        headers = {**_HEADERS, "Host": target.host_header}
        failures: list[str] = []
        for address in addresses:
            remaining = _remaining(deadline, target.url, self.policy.timeout_seconds)
            pool = self._pool(target, address, remaining)
            try:
                try:
                    response = pool.urlopen(
                        "GET", target.request_path, headers=headers, retries=False, preload_content=False
                    )
                except NewConnectionError as exc:
                    failures.append(f"{address}: {exc}")
                    continue
                try:
                    yield response
                finally:
                    response.close()
                return
            except HTTPError as exc:  # from the request or from reading the body in the caller
                raise _translate_http_error(exc, target.url, self.policy.timeout_seconds) from exc
            finally:
                pool.close()
        raise ImageFetchTransientError(
            f"cannot connect to {target.host} for {target.url}: {'; '.join(failures)}"
        )

    def _checked_addresses(self, target: _HttpTarget) -> list[IPAddress]:
        """The host's addresses, refusing the fetch if any is non-public (unless allowed).

        All addresses are checked, not just the one used: a name that resolves to both a public and
        a private address is an attack (or a misconfiguration) either way.
        """
        addresses = _resolve(target.host, target.port)
        if not self.policy.allow_private_networks:
            for address in addresses:
                reason = address_refusal(address)
                if reason is not None:
                    raise ImageFetchRefusedError(
                        f"refusing {target.url}: host {target.host!r} resolves to {address}, a {reason} "
                        "address (set VITSCOPE_ALLOW_PRIVATE_NETWORKS=true to allow private networks)"
                    )
        return addresses

    def _pool(self, target: _HttpTarget, address: IPAddress, timeout: float) -> urllib3.HTTPConnectionPool:
        """A one-connection pool to ``address`` that still speaks TLS to ``target.host``.

        For https, ``server_hostname`` sends the real name in SNI and ``assert_hostname`` verifies the
        certificate against it, not against the IP the socket is connected to.
        """
        timeouts = urllib3.Timeout(connect=timeout, read=timeout)
        if target.scheme == "https":
            return urllib3.HTTPSConnectionPool(
                str(address),
                target.port,
                timeout=timeouts,
                maxsize=1,
                cert_reqs="CERT_REQUIRED",
                server_hostname=target.host,
                assert_hostname=target.host,
            )
        return urllib3.HTTPConnectionPool(str(address), target.port, timeout=timeouts, maxsize=1)

    def _read_body(self, response: urllib3.BaseHTTPResponse, url: str, deadline: float) -> bytes:
        """Stream the body, stopping as soon as it passes the size limit or the deadline.

        A declared Content-Length over the limit is refused before reading; without one (chunked or
        close-delimited bodies) the count of received bytes decides. ``read1`` returns whatever one
        socket read gives, so a server dripping bytes is cut off at the deadline even though every
        single read is quick.
        """
        limit = self.policy.max_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ImageTooLargeError(f"{url} is {declared} bytes (Content-Length), over the limit of {limit}")
        chunks: list[bytes] = []
        received = 0
        while chunk := response.read1(_CHUNK_BYTES, decode_content=True):
            received += len(chunk)
            if received > limit:
                raise ImageTooLargeError(f"{url} sent more than the limit of {limit} bytes")
            chunks.append(chunk)
            _remaining(deadline, url, self.policy.timeout_seconds)
        return b"".join(chunks)


def _local_folder(url: str | None) -> Path | None:
    """The resolved folder of a local results store (``file://`` or a path), else ``None``."""
    if not url or uri_scheme(url) not in ("", "file"):
        return None
    try:
        path = file_uri_path(url) if uri_scheme(url) == "file" else Path(url)
    except ValueError:
        return None
    return Path(os.path.realpath(path))


def _resolve(host: str, port: int) -> list[IPAddress]:
    """The distinct addresses of ``host``, in resolver order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_NONAME:
            raise ImageError(f"no such host: {host}") from exc
        raise ImageFetchTransientError(f"cannot resolve {host}: {exc}") from exc
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _remaining(deadline: float, url: str, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageFetchTransientError(f"fetching {url} took longer than {timeout:g} s")
    return remaining


def _check_status(status: int, url: str) -> None:
    """Accept 2xx; 408, 429 and 5xx may pass (transient); any other status will not (permanent)."""
    if 200 <= status < 300:
        return
    message = f"HTTP {status} for {url}"
    if status in (408, 429) or status >= 500:
        raise ImageFetchTransientError(message)
    raise ImageError(message)


def _translate_http_error(exc: HTTPError, url: str, timeout: float) -> ImageError | ImageFetchTransientError:
    """The vitscope error for a urllib3 failure: permanent only when retrying cannot help."""
    if isinstance(exc, Urllib3TimeoutError):
        # urllib3's timeouts are the time that was left before the deadline, so when one fires the
        # deadline has passed too: the same message as the deadline check's, whichever fires first.
        return ImageFetchTransientError(f"fetching {url} took longer than {timeout:g} s (timed out: {exc})")
    if isinstance(exc, SSLError) and _is_certificate_error(exc):
        return ImageError(f"TLS certificate of {url} not accepted: {exc}")
    if isinstance(exc, DecodeError):
        return ImageError(f"undecodable response body from {url}: {exc}")
    # Connection resets, truncated bodies, TLS handshake failures.
    return ImageFetchTransientError(f"connection failed fetching {url}: {exc}")


def _is_certificate_error(exc: BaseException) -> bool:
    """Whether a TLS failure is a rejected certificate (permanent) rather than a broken handshake."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError | HostnameMismatchError):
            return True
        pending.extend([current.__cause__, current.__context__])
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
    return False
