"""Image fetching: what is fetched, what is refused, and which failures are worth a retry.

HTTP tests run against a real server on 127.0.0.1 (a thread in this process). Since that address
is loopback, the tests either allow private networks or, to test the refusal of a later redirect
hop, let loopback stand in for a public address: no public address can be served from here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest

from common import fetch
from common.errors import (
    ImageError,
    ImageFetchRefusedError,
    ImageFetchTransientError,
    ImageTooLargeError,
    TransientError,
)
from common.fetch import (
    DefaultFetcher,
    FetchPolicy,
    MemoryFetcher,
    address_refusal,
    content_sha256,
)
from common.settings import Settings

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40  # 10248 bytes; the fetcher never decodes
LOCAL = FetchPolicy(allow_private_networks=True, timeout_seconds=5)


class _Handler(BaseHTTPRequestHandler):
    """Routes: /image.png, /image-no-length, /redirect/<n> (n redirects, then the image),
    /redirect-to?url=, /status/<code>, /slow, /drip, /big, /endless, /no-location, /gzip-garbage,
    /reset-before-headers, /reset-mid-body.

    HTTP/1.0, so a body without Content-Length ends when the connection closes.
    """

    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output clean."""

    def do_GET(self) -> None:
        self.server.hosts.append(self.headers.get("Host", ""))
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            return  # the client hung up early, as the size and time limits make it do

    def _route(self) -> None:
        parts = urlsplit(self.path)
        route, _, argument = parts.path.strip("/").partition("/")
        if route == "image.png":
            self._send(200, IMAGE)
        elif route == "image-no-length":
            self._send(200, IMAGE, length=False)
        elif route == "redirect":
            hops = int(argument)
            if hops == 0:
                self._send(200, IMAGE)
            else:
                self._redirect(f"/redirect/{hops - 1}")
        elif route == "redirect-to":
            self._redirect(parse_qs(parts.query)["url"][0])
        elif route == "no-location":
            self._send(302, b"")
        elif route == "status":
            self._send(int(argument), b"nope")
        elif route == "slow":
            time.sleep(30)  # far beyond any timeout a test sets: only the client's timeout ends the wait
            self._send(200, IMAGE)
        elif route == "drip":
            self._stream(chunk=b"x", pause=0.05, chunks=600)  # 30 s of quick little reads
        elif route == "big":
            self._send(200, bytes(10_000))
        elif route == "endless":
            self._stream(chunk=bytes(16 * 1024), pause=0.0, chunks=20_000)
        elif route == "gzip-garbage":  # says gzip although the fetcher asked for identity; is not gzip
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE)
        elif route == "reset-before-headers":
            self._reset()
        elif route == "reset-mid-body":
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE[:1000])
            self._reset()
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes, *, length: bool = True) -> None:
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection with a TCP reset (SO_LINGER 0), as a crashing server or proxy does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, *, chunk: bytes, pause: float, chunks: int) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(chunks):
            self.wfile.write(chunk)
            self.wfile.flush()
            time.sleep(pause)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hosts: list[str]


@dataclass
class LocalServer:
    base: str  # http(s)://127.0.0.1:<port>
    port: int
    hosts: list[str] = field(repr=False)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _serve(ssl_context: ssl.SSLContext | None = None, *, host: str = "127.0.0.1") -> Iterator[LocalServer]:
    server = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
    server.hosts = []
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    scheme = "https" if ssl_context is not None else "http"
    netloc = f"[{host}]" if ":" in host else host
    try:
        yield LocalServer(base=f"{scheme}://{netloc}:{port}", port=port, hosts=server.hosts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def http_server() -> Iterator[LocalServer]:
    yield from _serve()


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let 127.0.0.1 pass the address check, so a later hop's refusal can be tested."""
    real = fetch.address_refusal

    def refusal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        return None if str(address) == "127.0.0.1" else real(address)

    monkeypatch.setattr(fetch, "address_refusal", refusal)


# ---- the address policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::1", "private"),  # 6to4 wrapping of 10.0.0.1
        ("169.254.169.254", "link-local"),  # the cloud metadata endpoint
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("100.64.0.1", "not globally routable"),  # carrier-grade NAT
        ("93.184.215.14", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_policy_refuses_every_non_public_address(address: str, reason: str | None) -> None:
    assert address_refusal(address) == reason
    assert address_refusal(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/image.png",
        "http://localhost:{port}/image.png",
        "http://10.0.0.1/image.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::1]:{port}/image.png",
        "http://[fe80::1]/image.png",
        "http://0.0.0.0:{port}/image.png",
        "https://192.168.0.1/image.png",
    ],
)
def test_the_default_policy_refuses_private_hosts_before_connecting(
    http_server: LocalServer, url: str
) -> None:
    seen = len(http_server.hosts)
    started = time.monotonic()
    with pytest.raises(ImageFetchRefusedError, match="resolves to"):
        DefaultFetcher().fetch(url.format(port=http_server.port))
    # Refused, not timed out trying: a connection attempt would wait for the 30 s default timeout.
    assert time.monotonic() - started < 10
    assert len(http_server.hosts) == seen


def test_allow_private_networks_lets_the_local_server_through(http_server: LocalServer) -> None:
    assert DefaultFetcher(LOCAL).fetch(f"{http_server.base}/image.png") == IMAGE


# ---- http: success, redirects, statuses --------------------------------------------------------


def test_the_host_header_names_the_host_while_the_connection_goes_to_its_address(
    http_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once per hop, by the fetcher; the request still says which host it wants."""
    resolved: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: str, *args: object, **kwargs: object) -> object:
        resolved.append(host)
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    del http_server.hosts[:]
    assert DefaultFetcher(LOCAL).fetch(f"http://localhost:{http_server.port}/redirect/2") == IMAGE
    # Two redirects and the image: three hops, one resolution of the name each; urllib3 only ever
    # "resolves" the IP literal it was given.
    assert [host for host in resolved if host != "127.0.0.1"] == ["localhost"] * 3
    assert http_server.hosts == [f"localhost:{http_server.port}"] * 3


@pytest.mark.parametrize(
    ("hops", "max_redirects", "follows"),
    [(0, 5, True), (1, 1, True), (5, 5, True), (6, 5, False), (1, 0, False)],
)
def test_redirects_are_followed_up_to_the_limit(
    http_server: LocalServer, hops: int, max_redirects: int, follows: bool
) -> None:
    fetcher = DefaultFetcher(FetchPolicy(allow_private_networks=True, max_redirects=max_redirects))
    url = f"{http_server.base}/redirect/{hops}"
    if follows:
        assert fetcher.fetch(url) == IMAGE
    else:
        with pytest.raises(ImageError, match=f"more than {max_redirects} redirects"):
            fetcher.fetch(url)


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("http://10.0.0.1/x.png", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[::1]:{port}/image.png", "::1"),
        ("http://127.0.0.2:{port}/image.png", "127.0.0.2"),
    ],
)
@pytest.mark.usefixtures("loopback_is_public")
def test_every_redirect_hop_is_checked_against_the_policy(
    http_server: LocalServer, target: str, address: str
) -> None:
    """The first hop (127.0.0.1, public for this test) passes; the hop it redirects to must not."""
    fetcher = DefaultFetcher(FetchPolicy(timeout_seconds=5))
    assert fetcher.fetch(f"{http_server.base}/image.png") == IMAGE
    url = f"{http_server.base}/redirect-to?url={target.format(port=http_server.port)}"
    with pytest.raises(ImageFetchRefusedError, match=f"resolves to {address}"):
        fetcher.fetch(url)


@pytest.mark.parametrize("target", ["file:///etc/passwd", "s3://bucket/key.png", "ftp://host/x.png"])
def test_a_redirect_to_another_scheme_is_refused(http_server: LocalServer, target: str) -> None:
    with pytest.raises(ImageFetchRefusedError, match="only http"):
        DefaultFetcher(LOCAL).fetch(f"{http_server.base}/redirect-to?url={target}")


def test_a_redirect_without_location_is_an_image_error(http_server: LocalServer) -> None:
    with pytest.raises(ImageError, match="without a Location"):
        DefaultFetcher(LOCAL).fetch(f"{http_server.base}/no-location")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, ImageError),
        (403, ImageError),
        (410, ImageError),
        (400, ImageError),
        (401, ImageError),
        (408, ImageFetchTransientError),
        (429, ImageFetchTransientError),
        (500, ImageFetchTransientError),
        (502, ImageFetchTransientError),
        (503, ImageFetchTransientError),
    ],
)
def test_http_statuses_map_to_permanent_or_transient_errors(
    http_server: LocalServer, status: int, error: type[Exception]
) -> None:
    url = f"{http_server.base}/status/{status}"
    with pytest.raises(error, match=f"HTTP {status} for {url}") as raised:
        DefaultFetcher(LOCAL).fetch(url)
    assert type(raised.value) is error


@pytest.mark.parametrize(("route", "timeout"), [("slow", 0.3), ("drip", 0.5)])
def test_a_fetch_longer_than_the_timeout_is_cut_off_as_a_transient_error(
    http_server: LocalServer, route: str, timeout: float
) -> None:
    """A server that never answers, and one whose every read is quick but whose body never ends:
    either urllib3's socket timeout or the deadline on the whole fetch stops it — which one fires
    first depends on scheduling, so both say the same thing."""
    started = time.monotonic()
    with pytest.raises(ImageFetchTransientError, match=rf"{route} took longer than {timeout:g} s"):
        DefaultFetcher(FetchPolicy(allow_private_networks=True, timeout_seconds=timeout)).fetch(
            f"{http_server.base}/{route}"
        )
    assert time.monotonic() - started < 15  # the servers would keep it for 30 s


def test_a_refused_connection_is_a_transient_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageFetchTransientError, match="cannot connect"):
        DefaultFetcher(LOCAL).fetch(f"http://127.0.0.1:{port}/image.png")


def test_a_body_that_cannot_be_decoded_is_a_permanent_image_error(http_server: LocalServer) -> None:
    with pytest.raises(ImageError, match="undecodable response body") as raised:
        DefaultFetcher(LOCAL).fetch(f"{http_server.base}/gzip-garbage")
    assert not isinstance(raised.value, TransientError)


@pytest.mark.parametrize("route", ["reset-before-headers", "reset-mid-body"])
def test_a_connection_reset_is_a_transient_error(http_server: LocalServer, route: str) -> None:
    with pytest.raises(ImageFetchTransientError, match="connection failed"):
        DefaultFetcher(LOCAL).fetch(f"{http_server.base}/{route}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http:///image.png", "no host"),
        ("http://:8080/image.png", "no host"),
        ("https://?q=1", "no host"),
        ("http://example.com:99999/image.png", "invalid URL"),
        ("http://[::1/image.png", "invalid URL"),
    ],
)
def test_a_url_without_a_usable_host_is_a_permanent_image_error(url: str, message: str) -> None:
    with pytest.raises(ImageError, match=message) as raised:
        DefaultFetcher(LOCAL).fetch(url)
    assert not isinstance(raised.value, TransientError | ImageFetchRefusedError)


def _resolver(monkeypatch: pytest.MonkeyPatch, host: str, answer: object) -> None:
    """Make the system resolver give ``answer`` (a list of addresses, or an exception) for ``host``.

    Resolver faults and dual-stack answers cannot be had from this machine's real resolver; the
    connections the fetcher then makes are real.
    """
    real = socket.getaddrinfo

    def getaddrinfo(name: str, port: object, *args: object, **kwargs: object) -> object:
        if name != host:
            return real(name, port, *args, **kwargs)  # type: ignore[arg-type]
        if isinstance(answer, BaseException):
            raise answer
        return [
            (
                socket.AF_INET6 if ":" in address else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (address, port),
            )
            for address in answer  # type: ignore[union-attr]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    ("error", "expected", "message"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), ImageError, "no such host"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), ImageFetchTransientError, "cannot resolve"),
        (
            socket.gaierror(socket.EAI_FAIL, "Non-recoverable failure"),
            ImageFetchTransientError,
            "cannot resolve",
        ),
    ],
)
def test_resolver_errors_are_permanent_only_for_names_that_do_not_exist(
    monkeypatch: pytest.MonkeyPatch, error: socket.gaierror, expected: type[Exception], message: str
) -> None:
    _resolver(monkeypatch, "images.example", error)
    with pytest.raises(expected, match=f"{message}.*images.example|images.example.*{message}") as raised:
        DefaultFetcher(LOCAL).fetch("http://images.example/cat.png")
    assert type(raised.value) is expected


def test_a_dual_stack_host_is_fetched_from_its_second_address_when_the_first_refuses(
    http_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The IPv6 address comes first and nothing listens there (as on a host without an IPv6 route):
    the fetch goes on to the IPv4 address, still sending the host's name."""
    _resolver(monkeypatch, "dual.example", ["::1", "127.0.0.1"])
    del http_server.hosts[:]
    assert DefaultFetcher(LOCAL).fetch(f"http://dual.example:{http_server.port}/image.png") == IMAGE
    assert http_server.hosts == [f"dual.example:{http_server.port}"]


def test_a_host_none_of_whose_addresses_answers_is_a_transient_error_naming_each() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _resolver(monkeypatch, "dual.example", ["::1", "127.0.0.1"])
        with pytest.raises(ImageFetchTransientError, match=r"cannot connect to dual\.example") as raised:
            DefaultFetcher(LOCAL).fetch(f"http://dual.example:{port}/image.png")
    assert "::1: " in str(raised.value)
    assert "127.0.0.1: " in str(raised.value)


@pytest.fixture(scope="module")
def http_server_v6() -> Iterator[LocalServer]:
    try:
        socket.socket(socket.AF_INET6).close()
        yield from _serve(host="::1")
    except OSError as exc:  # pragma: no cover - a machine without IPv6 loopback
        pytest.skip(f"no IPv6 loopback here: {exc}")


def test_an_ipv6_literal_url_sends_a_bracketed_host_header(http_server_v6: LocalServer) -> None:
    del http_server_v6.hosts[:]
    assert DefaultFetcher(LOCAL).fetch(f"http://[::1]:{http_server_v6.port}/redirect/1") == IMAGE
    assert http_server_v6.hosts == [f"[::1]:{http_server_v6.port}"] * 2


# ---- size limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["image.png", "image-no-length"])
@pytest.mark.parametrize(("max_bytes", "fits"), [(len(IMAGE), True), (len(IMAGE) - 1, False)])
def test_the_size_limit_is_inclusive_with_and_without_content_length(
    http_server: LocalServer, route: str, max_bytes: int, fits: bool
) -> None:
    fetcher = DefaultFetcher(FetchPolicy(allow_private_networks=True, max_bytes=max_bytes))
    url = f"{http_server.base}/{route}"
    if fits:
        assert fetcher.fetch(url) == IMAGE
    else:
        with pytest.raises(ImageTooLargeError, match=f"limit of {max_bytes}"):
            fetcher.fetch(url)


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(http_server: LocalServer) -> None:
    with pytest.raises(ImageTooLargeError, match="10000 bytes \\(Content-Length\\)"):
        DefaultFetcher(FetchPolicy(allow_private_networks=True, max_bytes=1000)).fetch(
            f"{http_server.base}/big"
        )


def test_an_endless_body_is_cut_off_as_soon_as_it_passes_the_limit(http_server: LocalServer) -> None:
    """The server would stream 320 MB; reading it all would run into the timeout instead (the error
    type proves the size check stopped it; the clock only shows it did not read on)."""
    started = time.monotonic()
    policy = FetchPolicy(allow_private_networks=True, max_bytes=100_000, timeout_seconds=60)
    with pytest.raises(ImageTooLargeError, match="more than the limit of 100000"):
        DefaultFetcher(policy).fetch(f"{http_server.base}/endless")
    assert time.monotonic() - started < 30


# ---- https: SNI and certificate checks against the name, while connecting to the address -------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for the name "localhost" only (no IP address in it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vitscope test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def https_server(tls_files: tuple[Path, Path, Path]) -> Iterator[LocalServer]:
    _, cert_path, key_path = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    yield from _serve(context)


@pytest.fixture
def trust_test_ca(tls_files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL's default verify paths honour SSL_CERT_FILE, as they would a corporate CA bundle."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))


@pytest.mark.usefixtures("trust_test_ca")
def test_https_verifies_the_certificate_against_the_host_name(https_server: LocalServer) -> None:
    del https_server.hosts[:]
    url = f"https://localhost:{https_server.port}/image.png"
    assert DefaultFetcher(LOCAL).fetch(url) == IMAGE
    assert https_server.hosts == [f"localhost:{https_server.port}"]


@pytest.mark.usefixtures("trust_test_ca")
def test_https_to_a_name_the_certificate_does_not_cover_is_refused_for_good(
    https_server: LocalServer,
) -> None:
    with pytest.raises(ImageError, match="certificate") as raised:
        DefaultFetcher(LOCAL).fetch(f"{https_server.base}/image.png")  # 127.0.0.1 is not in the cert
    assert not isinstance(raised.value, TransientError)


def test_https_with_an_untrusted_certificate_is_refused_for_good(https_server: LocalServer) -> None:
    with pytest.raises(ImageError, match="certificate"):
        DefaultFetcher(LOCAL).fetch(f"https://localhost:{https_server.port}/image.png")


# ---- files and object storage ------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "cat 1.png"
    path.parent.mkdir()
    path.write_bytes(IMAGE)
    return path


def _files(root: Path, **limits: int) -> DefaultFetcher:
    """A fetcher that may read local files under ``root`` (``common.local_files`` has the policy's tests)."""
    return DefaultFetcher(FetchPolicy(file_roots=(root,), **limits))


@pytest.mark.parametrize("spelling", ["file_uri", "file_uri_localhost", "absolute_path"])
def test_local_images_are_read_by_file_uri_or_absolute_path(image_file: Path, spelling: str) -> None:
    uri = {
        "file_uri": image_file.as_uri(),
        "file_uri_localhost": "file://localhost" + image_file.as_uri().removeprefix("file://"),
        "absolute_path": str(image_file),
    }[spelling]
    assert _files(image_file.parent).fetch(uri) == IMAGE


def test_a_relative_path_is_refused_even_when_the_file_exists(image_file: Path) -> None:
    assert Path("images/cat 1.png").is_file()  # the autouse fixture chdirs into tmp_path
    with pytest.raises(ImageError, match="relative image path"):
        _files(image_file.parent.parent).fetch("images/cat 1.png")


@pytest.mark.parametrize(
    ("relative", "message"), [("images/missing.png", "no such file"), ("images", "not a regular file")]
)
def test_a_path_without_an_image_file_is_an_image_error(
    image_file: Path, tmp_path: Path, relative: str, message: str
) -> None:
    for uri in (str(tmp_path / relative), (tmp_path / relative).as_uri()):
        with pytest.raises(ImageError, match=message):
            _files(tmp_path).fetch(uri)


@pytest.mark.parametrize(("max_bytes", "fits"), [(len(IMAGE), True), (len(IMAGE) - 1, False)])
def test_the_size_limit_applies_to_files(image_file: Path, max_bytes: int, fits: bool) -> None:
    fetcher = _files(image_file.parent, max_bytes=max_bytes)
    if fits:
        assert fetcher.fetch(str(image_file)) == IMAGE
    else:
        with pytest.raises(ImageTooLargeError):
            fetcher.fetch(str(image_file))


def test_a_file_uri_on_another_host_is_refused() -> None:
    with pytest.raises(ImageFetchRefusedError, match="fileserver"):
        DefaultFetcher().fetch("file://fileserver/share/cat.png")


@pytest.fixture
def s3_image(s3_bucket: str) -> str:
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="images/cat.png", Body=IMAGE)
    return f"s3://{s3_bucket}/images/cat.png"


@pytest.mark.parametrize(("max_bytes", "fits"), [(len(IMAGE), True), (len(IMAGE) - 1, False)])
def test_s3_images_are_read_with_the_size_limit(
    s3_image: str, s3_bucket: str, max_bytes: int, fits: bool
) -> None:
    fetcher = DefaultFetcher(FetchPolicy(max_bytes=max_bytes, s3_sources=(s3_bucket,)))
    if fits:
        assert fetcher.fetch(s3_image) == IMAGE
    else:
        with pytest.raises(ImageTooLargeError, match=f"limit of {max_bytes}"):
            fetcher.fetch(s3_image)


def test_a_missing_s3_image_is_an_image_error(s3_bucket: str) -> None:
    with pytest.raises(ImageError, match="no such object"):
        DefaultFetcher(FetchPolicy(s3_sources=(s3_bucket,))).fetch(f"s3://{s3_bucket}/images/missing.png")


@pytest.mark.parametrize(
    "uri",
    ["ftp://host/cat.png", "gopher://host/cat", "memory://store/cat.png", "data://image/png;base64,iVBO", ""],
)
def test_unknown_schemes_are_refused(uri: str) -> None:
    with pytest.raises(ImageFetchRefusedError, match="supported are"):
        DefaultFetcher().fetch(uri)


# ---- the rest of the public surface ------------------------------------------------------------


def test_memory_fetcher_serves_its_dictionary_and_nothing_else() -> None:
    fetcher = MemoryFetcher({"s3://b/cat.png": IMAGE})
    assert fetcher.fetch("s3://b/cat.png") == IMAGE
    with pytest.raises(ImageError, match=r"no such image: s3://b/dog\.png"):
        fetcher.fetch("s3://b/dog.png")


def test_content_sha256_is_the_hex_sha256_of_the_bytes() -> None:
    assert content_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_sha256(IMAGE) == hashlib.sha256(IMAGE).hexdigest()
    assert content_sha256(IMAGE) != content_sha256(IMAGE + b"\x00")


def test_the_policy_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSCOPE_FILE_ROOTS", "/data/images:/mnt/scans")
    monkeypatch.setenv("VITSCOPE_S3_SOURCES", "photos, scans/2024")
    monkeypatch.setenv("VITSCOPE_ALLOW_HARD_LINKS", "true")
    monkeypatch.setenv("VITSCOPE_STORAGE_URL", "s3://results/run")
    settings = Settings(max_image_bytes=1234, fetch_timeout_seconds=2.5, allow_private_networks=True)
    assert FetchPolicy.from_settings(settings) == FetchPolicy(
        max_bytes=1234,
        timeout_seconds=2.5,
        allow_private_networks=True,
        max_redirects=5,
        file_roots=(Path("/data/images"), Path("/mnt/scans")),
        allow_hard_links=True,
        s3_sources=("photos", "scans/2024"),
        results_url="s3://results/run",
    )


def test_the_default_policy_matches_the_default_settings() -> None:
    """The same limits; the settings also say where results are stored, never to be read as inputs."""
    settings = Settings()
    assert FetchPolicy.from_settings(settings) == FetchPolicy(results_url=settings.resolved_storage_url())
