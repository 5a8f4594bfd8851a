"""Downloading an image by URL on a shared machine: http(s) only, a size and a time limit, and no private
addresses unless the config allows them.

A dataset or a prompt is not trusted: a URL in it could make a training server read its cloud metadata
service (169.254.169.254), an internal admin page or a local file, or stall a run with an endless download.
So every hop is checked before it is requested: the scheme is http or https, and every address the host
resolves to is a public one (not loopback, private, link-local, shared or reserved) unless it lies in
`storage.url_allow_networks`. Redirects are followed by hand so that each new location is checked the same
way (`file://` and private targets are refused); the body is read up to `storage.url_max_mib`, within
`storage.url_timeout_s` in all.

Left open: the address is checked when the name is resolved here, and the HTTP library resolves it again
to connect; a DNS server that answers differently the second time (rebinding) is not caught.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from vlmops.config import StorageConfig
from vlmops.errors import UserInputError

HTTP_RETRIES = 3
HTTP_BACKOFF_S = 0.5  # urllib3 backs off exponentially from this factor between tries
# Worth another try: the server's own failures and throttling. A 4xx other than 429 answers the same again.
HTTP_RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_REDIRECTS = 5
CHUNK = 64 * 1024

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlFetchError(UserInputError):
    """A URL that was refused or could not be downloaded; the message says why and what to change."""


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
def http_session() -> requests.Session:
    """The session image downloads share: pooled connections, and urllib3's retry with backoff for
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
    adapter = HTTPAdapter(max_retries=retry)
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
        check_url(current, policy, via=url if current != url else None)
        try:
            response = http_session().get(
                current, timeout=policy.timeout_s, stream=True, allow_redirects=False, headers={"Accept": "image/*"}
            )
        except requests.RequestException as err:
            if _timed_out(err):
                raise UrlFetchError(
                    f"no answer within {policy.timeout_s:g} s, {HTTP_RETRIES} retries (storage.url_timeout_s)"
                ) from err
            raise UrlFetchError(
                f"could not download it after {HTTP_RETRIES} retries ({err}); is the host reachable?"
            ) from err
        with response:
            if response.is_redirect:
                current = urljoin(current, response.headers["Location"])
                continue
            return _read_body(response, policy, deadline)
    raise UrlFetchError(f"more than {MAX_REDIRECTS} redirects")


def check_url(url: str, policy: UrlPolicy, via: str | None = None) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to an address the policy does not allow."""
    how = f"redirected to {url}: " if via else ""
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
        kind = _non_public_kind(address)
        if kind and not any(address in network for network in policy.allow_networks if _same_family(address, network)):
            raise UrlFetchError(
                f"{how}host {host} is {address}, a {kind} address: refused by default on a shared machine; "
                f"if the images are served from inside your network on purpose, add it to storage.url_allow_networks "
                f'(e.g. "{address}/{address.max_prefixlen}")'
            )


def _read_body(response: requests.Response, policy: UrlPolicy, deadline: float) -> bytes:
    if response.status_code == 404:
        raise UrlFetchError("HTTP 404 not found")
    if not response.ok:
        tried = f" after {HTTP_RETRIES} retries" if response.status_code in HTTP_RETRY_STATUSES else ""
        raise UrlFetchError(f"HTTP {response.status_code} {response.reason}{tried}")
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
        raise UrlFetchError(f"the download broke off ({err})") from err
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
