"""Downloading an image by URL on a shared machine: http(s) only, a size and a time limit, and no private
addresses unless the config allows them.

A dataset or a prompt is not trusted: a URL in it could make a training server read its cloud metadata
service (169.254.169.254), an internal admin page or a local file, or stall a run with an endless download.
So every hop is checked before it is requested: the scheme is http or https, and every address the host
resolves to is a public one (not loopback, private, link-local, shared or reserved) unless it lies in
`storage.url_allow_networks`. Redirects are followed by hand so that each new location is checked the same
way (`file://` and private targets are refused); the body is read up to `storage.url_max_mib`, within
`storage.url_timeout_s` in all.

The HTTP library resolves the name again to connect, and a DNS server may answer differently the second
time (rebinding: a public address for the check, 127.0.0.1 for the connection). So the address actually
connected to is checked too, by the same rule: the connections of `http_session` read their socket's peer
address right after the TCP connect and close the socket, before a TLS handshake or a request byte, if the
policy refuses it. The check up front stays: it gives the early, plain error for the common case.

Through a proxy (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY in the environment, which requests honours) the socket's
peer is the proxy, which the operator chose and which is often on a private address itself; it is not
checked, and the proxy resolves the target's name on its own. Then only the check up front applies, on this
machine's answer for the name: against rebinding, the proxy has to refuse private targets itself.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util.retry import Retry

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError

HTTP_RETRIES = 3
HTTP_BACKOFF_S = 0.5  # urllib3 backs off exponentially from this factor between tries
# Connections kept per host: at least the threads that download at once (validation's 16, a batch job's up to 8);
# requests' default of 10 made validation's downloads open and drop a connection each, with a warning each.
CONNECTIONS_PER_HOST = 16
# Worth another try: the server's own failures and throttling. A 4xx other than 429 answers the same again.
HTTP_RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 5
CHUNK = 64 * 1024

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlFetchError(UserInputError):
    """A URL that was refused or could not be downloaded; the message says why and what to change. `retryable`: the
    failure may pass (no connection, a broken download, a 5xx or 429 after the retries), unlike a 4xx, a refused
    address, a body over the limit or a server slower than `storage.url_timeout_s` (the setting's to change)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class UrlPolicy:
    """The limits on one download (see `StorageConfig` for what each means)."""

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 30.0
    allow_networks: tuple[IpNetwork, ...] = ()

    @classmethod
    def from_storage(cls, storage: StorageConfig | None) -> UrlPolicy:
        storage = storage or StorageConfig()
        return cls(
            max_bytes=int(storage.url_max_mib * 1024 * 1024),
            timeout_s=storage.url_timeout_s,
            allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in storage.url_allow_networks),
        )


@functools.cache
def http_session(allow_networks: tuple[IpNetwork, ...] = ()) -> requests.Session:
    """The session the image downloads under one allow list share: pooled connections that refuse a peer
    address outside `allow_networks` (see `PeerCheckedAdapter`), and urllib3's retry with backoff for
    connection errors, 5xx and 429 (honouring Retry-After), never for another 4xx. Redirects are not
    followed here: `fetch_url` follows them itself, checking each hop."""
    retry = Retry(
        total=HTTP_RETRIES,
        backoff_factor=HTTP_BACKOFF_S,
        status_forcelist=HTTP_RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
        redirect=False,
        raise_on_status=False,  # the last response comes back, and its status goes into the message
    )
    session = requests.Session()
    adapter = PeerCheckedAdapter(allow_networks, max_retries=retry, pool_maxsize=CONNECTIONS_PER_HOST)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def fetch_url(url: str, policy: UrlPolicy | None = None) -> bytes:
    """The body of an http(s) URL, within the policy's limits.

    Raises:
        UrlFetchError: a refused scheme or address (here or after a redirect), an HTTP error, too large,
            too slow, or unreachable.
    """
    policy = policy or UrlPolicy()
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        via = url if current != url else None
        check_url(current, policy, via=via)
        try:
            response = http_session(policy.allow_networks).get(
                current, timeout=policy.timeout_s, stream=True, allow_redirects=False, headers={"Accept": "image/*"}
            )
        except RefusedPeerError as err:
            raise UrlFetchError(f"{_hop(current, via)}{err}") from err
        except requests.RequestException as err:
            if _timed_out(err):
                raise UrlFetchError(  # the setting decides, not the moment: the record's problem
                    f"no answer within {policy.timeout_s:g} s, {HTTP_RETRIES} retries (storage.url_timeout_s)"
                ) from err
            raise UrlFetchError(
                f"could not download it after {HTTP_RETRIES} retries ({err}); is the host reachable?", retryable=True
            ) from err
        with response:
            if response.is_redirect:
                current = urljoin(current, response.headers["Location"])
                continue
            return _read_body(response, policy, deadline)
    raise UrlFetchError(f"more than {MAX_REDIRECTS} redirects")


def check_url(url: str, policy: UrlPolicy, via: str | None = None) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to an address the policy does not allow."""
    how = _hop(url, via)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlFetchError(f"{how}only http:// and https:// URLs are fetched, not {parts.scheme or 'no scheme'}://")
    host = parts.hostname
    if not host:
        raise UrlFetchError(f"{how}the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as err:
        raise UrlFetchError(f"{how}cannot resolve host {host} ({err})") from err
    for info in infos:
        address = _address(str(info[4][0]))
        kind = _refused_kind(address, policy.allow_networks)
        if kind:
            raise UrlFetchError(f"{how}host {host} is {_refusal(address, kind)}")


class RefusedPeerError(UrlFetchError):
    """The address a connection reached is one the policy refuses (the name resolved differently to connect
    than when it was checked); `fetch_url` adds which URL."""


class PeerCheckedHTTPConnection(HTTPConnection):
    """A urllib3 connection that refuses its peer address by the URL policy right after the TCP connect.

    `_new_conn` is the one place both schemes open the socket, before HTTPS wraps it in TLS and before a
    request (or a proxy's CONNECT) is written, so a refused peer has received no byte. The error is not an
    OSError: urllib3 neither retries it nor wraps it, it closes the connection and lets it through.
    """

    def __init__(self, *args: Any, allow_networks: tuple[IpNetwork, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_networks = allow_networks

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        try:
            address = _address(str(sock.getpeername()[0]))
        except OSError:  # the peer hung up already: fail closed (urllib3 retries it as a connection error)
            sock.close()
            raise
        kind = _refused_kind(address, self.allow_networks)
        if kind:
            sock.close()
            raise RefusedPeerError(
                f"host {self.host} connected to {_refusal(address, kind)}; the name resolved to an allowed address "
                "when checked a moment before (its DNS answers changed between the two lookups)"
            )
        return sock


class PeerCheckedHTTPSConnection(PeerCheckedHTTPConnection, HTTPSConnection):
    """The https:// twin: the peer check of `PeerCheckedHTTPConnection`, then `HTTPSConnection`'s TLS."""


class PeerCheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = PeerCheckedHTTPConnection


class PeerCheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = PeerCheckedHTTPSConnection


class PeerCheckedPools(urllib3.PoolManager):
    """A pool manager whose pools open `PeerChecked*Connection`s under one allow list."""

    def __init__(self, allow_networks: tuple[IpNetwork, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_networks = allow_networks
        self.pool_classes_by_scheme = {"http": PeerCheckedHTTPPool, "https": PeerCheckedHTTPSPool}

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        # urllib3's documented hook for customising pools; the allow list goes in here, after the pool key
        # was made (a key field it does not know would be a TypeError), and reaches each connection.
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["allow_networks"] = self.allow_networks
        return super()._new_pool(scheme, host, port, context)


class PeerCheckedAdapter(HTTPAdapter):
    """requests' adapter with `PeerCheckedPools` for direct connections. Connections through a proxy come
    from requests' own proxy managers and are not peer-checked (see the module docstring)."""

    def __init__(self, allow_networks: tuple[IpNetwork, ...], **kwargs: Any) -> None:
        self.allow_networks = allow_networks  # before HTTPAdapter.__init__, which calls init_poolmanager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)  # records the sizes proxies reuse
        self.poolmanager = PeerCheckedPools(
            self.allow_networks, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )


def _read_body(response: requests.Response, policy: UrlPolicy, deadline: float) -> bytes:
    if response.status_code == 404:
        raise UrlFetchError("HTTP 404 not found")
    if not response.ok:
        retried = response.status_code in HTTP_RETRY_STATUSES
        tried = f" after {HTTP_RETRIES} retries" if retried else ""
        raise UrlFetchError(f"HTTP {response.status_code} {response.reason}{tried}", retryable=retried)
    limit = f"larger than storage.url_max_mib ({policy.max_bytes / 1024 / 1024:.3g} MiB)"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise UrlFetchError(f"{limit}: the server announces {int(declared):,} bytes")
    body = bytearray()
    try:
        for chunk in response.iter_content(CHUNK):
            body += chunk
            if len(body) > policy.max_bytes:
                raise UrlFetchError(f"{limit}: stopped reading at {len(body):,} bytes")
            if time.monotonic() > deadline:
                raise UrlFetchError(f"the download took longer than {policy.timeout_s:g} s (storage.url_timeout_s)")
    except requests.RequestException as err:
        raise UrlFetchError(f"the download broke off ({err})", retryable=True) from err
    return bytes(body)


def _timed_out(err: requests.RequestException) -> bool:
    """Whether a request failed by time: requests reports a read timeout that outlived the retries as a
    ConnectionError around urllib3's MaxRetryError, whose `reason` says what the last try ran into."""
    if isinstance(err, requests.Timeout):
        return True
    reason = getattr(err.args[0], "reason", None) if err.args else None
    if isinstance(reason, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError by inheritance only
        return False
    return isinstance(reason, TimeoutError | urllib3.exceptions.TimeoutError)


def _address(text: str) -> IpAddress:
    address = ipaddress.ip_address(text.split("%")[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return address


def _hop(url: str, via: str | None) -> str:
    """The prefix of an error about a redirect's target (the caller names the URL it asked for)."""
    return f"redirected to {url}: " if via else ""


def _refused_kind(address: IpAddress, allow_networks: tuple[IpNetwork, ...]) -> str | None:
    """What kind of non-public address this is when no allowed network holds it, else None."""
    kind = _non_public_kind(address)
    if kind and any(address in network for network in allow_networks if _same_family(address, network)):
        return None
    return kind


def _refusal(address: IpAddress, kind: str) -> str:
    return (
        f"{address}, a {kind} address: refused by default on a shared machine; if the images are served from "
        f'inside your network on purpose, add it to storage.url_allow_networks (e.g. "{address}/{address.max_prefixlen}")'
    )


def _non_public_kind(address: IpAddress) -> str | None:
    """What kind of non-public address this is, or None for a public one."""
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return kind
    return None if address.is_global else "non-public"


def _same_family(address: IpAddress, network: IpNetwork) -> bool:
    return address.version == network.version
