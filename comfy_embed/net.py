"""Outbound HTTP: where it may go, the clients it goes through, and the one
way redirects are followed. Image and media URLs, models by URL and webhooks
all go out through here, so they obey the same rules.

- :class:`AddressPolicy`: public addresses only, unless the allowlist admits
  a host or network; checked after DNS resolution, every address a name
  resolves to.
- :func:`pinned_request`: a request to the address that was checked, so a
  DNS answer that changes between check and connect (rebinding) cannot slip by.
- :func:`new_client` is the one client factory; :class:`HttpClients` keeps
  one client per event loop for an owner (the image fetcher, the webhooks),
  closed by its ``aclose``.
- :func:`follow`: a GET whose every redirect hop is checked before it is
  connected to, at most ``max_redirects`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
import weakref
from typing import AsyncIterator, Callable, Iterable, Union
from urllib.parse import urljoin

import anyio
import httpx

from comfy_embed.errors import ComfyEmbedError

__all__ = ["AddressPolicy", "HttpClients", "new_client", "pinned_request", "follow",
           "REDIRECTS"]

log = logging.getLogger(__name__)

_IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_Net = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Statuses that send a client elsewhere (with a ``Location``).
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200",
                                               "fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _why_refused(ip: _IP) -> str | None:
    """Why an address may not be reached by default (None: public)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.version == 4 and ip in _CGNAT:
        return "a carrier-grade NAT (100.64/10) address"
    # Most specific first: Python counts 0.0.0.0/8 and 240/4 as "private" too.
    for attr, what in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, attr):
            return f"a {what} address"
    if not ip.is_global:
        return "a non-public address"
    return None


class AddressPolicy:
    """Where outgoing HTTP may go: public addresses, plus ``allowlist`` entries
    (host names, or IPs/CIDRs) that admit private or loopback ones."""

    def __init__(self, allowlist: Iterable[str]) -> None:
        self._allow_hosts: set[str] = set()
        self._allow_nets: list[_Net] = []
        for entry in allowlist:
            try:
                self._allow_nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self._allow_hosts.add(entry.strip().lower().rstrip("."))

    async def check(self, url: str, error: Callable[[str], ComfyEmbedError]
                    ) -> tuple[httpx.URL, str, _IP]:
        """Parse ``url``, resolve its host and check every address it resolves to;
        return the URL, its host and the address to connect to. A refusal
        raises ``error(message)``: each caller's own error type."""
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as e:
            raise error(f"{url}: invalid URL ({e})") from None
        if target.scheme not in ("http", "https") or not target.host:
            raise error(f"{url}: only http and https URLs can be fetched")
        if target.userinfo:
            raise error(f"{url}: URLs with credentials are not supported")
        host = target.host
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, OSError, UnicodeError) as e:
            raise error(f"{url}: cannot resolve host {host} ({e})") from None
        addresses: list[_IP] = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise error(f"{url}: host {host} has no address")
        if host.lower().rstrip(".") not in self._allow_hosts:
            # Every address must pass: a name resolving to one public and one
            # internal address could otherwise be steered to the internal one.
            for ip in addresses:
                why = _why_refused(ip)
                if why and not any(ip in net for net in self._allow_nets):
                    raise error(
                        f"{url}: refused, {host} resolves to {ip}, {why} "
                        "(COMFY_EMBED_URL_ALLOWLIST can admit it)")
        return target, host, addresses[0]


def pinned_request(client: httpx.AsyncClient, method: str, target: httpx.URL, host: str, ip: _IP,
                   headers: dict[str, str], content: bytes | None = None) -> httpx.Request:
    """A request to the address :meth:`AddressPolicy.check` approved, so a DNS
    answer that changes after the check cannot redirect it; Host and TLS
    SNI/certificate checks still use the name from the URL."""
    return client.build_request(
        method, target.copy_with(host=str(ip)), content=content,
        headers={"Host": target.netloc.decode("ascii"), **headers},
        extensions={"sni_hostname": host})


@functools.cache
def _tls() -> ssl.SSLContext:
    # Loading the CA bundle costs tens of milliseconds (on the event loop when
    # a client is built there); the context is only read afterwards, so one
    # serves every client of the process.
    return httpx.create_ssl_context(trust_env=False)


def new_client(timeout: float) -> httpx.AsyncClient:
    """The one client factory for :func:`pinned_request` requests.

    No proxies or netrc from the environment, no automatic redirects (they
    go through :func:`follow`, which checks each hop), and no connection
    kept alive: each connection goes to the address checked for its URL,
    with that URL's host name for SNI, and must not serve another URL whose
    name resolved to the same address.
    """
    return httpx.AsyncClient(verify=_tls(), trust_env=False, follow_redirects=False,
                             timeout=timeout, limits=httpx.Limits(max_keepalive_connections=0))


class HttpClients:
    """One owner's client for each running event loop, made on first use.

    A client's connections belong to the loop that opened them, and
    ``run_workflow`` runs a loop per call, so a client is kept per loop
    (and forgotten with its loop). :meth:`aclose` closes the running loop's.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())

    def get(self) -> httpx.AsyncClient:
        """The client of the running loop."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = new_client(self.timeout)
        return client

    async def aclose(self) -> None:
        """Close the running loop's client; a later :meth:`get` makes a new one."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


@contextlib.asynccontextmanager
async def follow(client: httpx.AsyncClient, policy: AddressPolicy, url: str, *,
                 max_redirects: int, error: Callable[[str], ComfyEmbedError],
                 headers: dict[str, str] | None = None,
                 check_hop: Callable[[str, str], None] | None = None,
                 ) -> AsyncIterator[tuple[str, httpx.Response]]:
    """GET ``url``, following redirects; yield the final URL and its 200
    response, whose body is still to be read (streamed).

    Every hop's address passes ``policy`` before it is connected to, and
    ``check_hop(url, host)``, when given, may refuse it by raising. A status
    other than 200, or more than ``max_redirects`` redirects, raises
    ``error(message)``. Network failures are httpx's errors, for the caller
    to word.
    """
    first = url
    for _ in range(max_redirects + 1):
        target, host, ip = await policy.check(url, error)
        if check_hop is not None:
            check_hop(url, host)
        request = pinned_request(client, "GET", target, host, ip, headers or {})
        response = await client.send(request, stream=True)
        try:
            if response.status_code in REDIRECTS and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                log.debug("%s redirects to %s", first, url)
                continue
            if response.status_code != 200:
                raise error(f"{url}: HTTP {response.status_code}")
            yield url, response
            return
        finally:
            await response.aclose()
    raise error(f"{first}: more than {max_redirects} redirects")
