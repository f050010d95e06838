"""Outbound HTTP (comfy_embed.net): the address policy, the one client
factory and its per-loop clients, and the redirect follower, against real
servers on 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

from typing import Any, Iterator

import anyio
import httpx
import pytest

from comfy_embed.errors import ImageInputError
from comfy_embed.net import AddressPolicy, HttpClients, follow, new_client
from tests.fakes.web_server import PNG, Web, serve_web

pytestmark = pytest.mark.anyio

#: Admits 127.0.0.1 only: a server on 127.0.0.2 must never be reached.
LOCAL = AddressPolicy(["127.0.0.1"])


@pytest.fixture
def web() -> Iterator[Web]:
    with serve_web("127.0.0.1") as server:
        yield server


async def _get(url: str, policy: AddressPolicy = LOCAL, **kw: Any) -> tuple[str, bytes]:
    async with new_client(5.0) as client, follow(client, policy, url, max_redirects=2,
                                                 error=ImageInputError, **kw) as (final, r):
        return final, await r.aread()


# ----------------------------------------------------------------- the policy
@pytest.mark.parametrize("allowlist, admitted", [
    ((), False), (("127.0.0.1",), True), (("127.0.0.0/8",), True), (("10.0.0.0/8",), False),
])
async def test_loopback_needs_the_allowlist(allowlist: tuple[str, ...], admitted: bool) -> None:
    policy = AddressPolicy(allowlist)
    if admitted:
        _, host, ip = await policy.check("http://127.0.0.1:9/x", ImageInputError)
        assert (host, str(ip)) == ("127.0.0.1", "127.0.0.1")
    else:
        with pytest.raises(ImageInputError, match="127.0.0.1, a loopback address"):
            await policy.check("http://127.0.0.1:9/x", ImageInputError)


async def test_every_address_of_a_name_must_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    async def two_answers(host: str, port: int, **kw: Any) -> list[Any]:
        return [(2, 1, 6, "", ("93.184.215.14", port)), (2, 1, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr("comfy_embed.net.anyio.getaddrinfo", two_answers)
    with pytest.raises(ImageInputError, match="resolves to 10.0.0.7, a private address"):
        await AddressPolicy(()).check("https://mixed.example.test/x", ImageInputError)


@pytest.mark.parametrize("url, match", [
    ("ftp://127.0.0.1/x", "only http and https"),
    ("http://u:p@127.0.0.1/x", "credentials"),
    ("http://no-such-host.invalid/x", "cannot resolve host"),
])
async def test_unusable_urls_raise_the_callers_error(url: str, match: str) -> None:
    class Mine(ImageInputError):
        pass

    with pytest.raises(Mine, match=match):
        await LOCAL.check(url, Mine)


# --------------------------------------------------------------- the follower
async def test_redirects_are_followed_to_the_final_answer(web: Web) -> None:
    final, body = await _get(web.base + "/redirect?to=/ok.png")
    assert final == web.base + "/ok.png" and body == PNG
    assert [path for _, path in web.requests] == ["/redirect?to=/ok.png", "/ok.png"]


async def test_each_hop_is_checked_before_it_is_connected_to(web: Web) -> None:
    with serve_web("127.0.0.2") as other:
        with pytest.raises(ImageInputError, match="127.0.0.2, a loopback address"):
            await _get(web.base + "/redirect?to=" + other.base + "/ok.png")
        assert other.requests == []


async def test_a_hop_check_may_refuse_a_host(web: Web) -> None:
    seen: list[tuple[str, str]] = []

    def only_first(url: str, host: str) -> None:
        seen.append((url, host))
        if len(seen) > 1:
            raise ImageInputError(f"{url}: host {host} refused")

    with pytest.raises(ImageInputError, match="host 127.0.0.1 refused"):
        await _get(web.base + "/redirect?to=/ok.png", check_hop=only_first)
    assert [path for _, path in web.requests] == ["/redirect?to=/ok.png"]


@pytest.mark.parametrize("path, match", [
    ("/loop", "/loop: more than 2 redirects"), ("/missing.png", "/missing.png: HTTP 404"),
])
async def test_too_many_redirects_or_another_status_is_the_callers_error(
        web: Web, path: str, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        await _get(web.base + path)


async def test_the_connection_goes_to_the_checked_address(
        web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is resolved once, by the policy; the client connects to that
    address with the original Host header, so a second (rebinding) answer
    cannot matter."""
    calls: list[str] = []

    async def resolve(host: str, port: int, **kw: Any) -> list[Any]:
        calls.append(host)
        return [(2, 1, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr("comfy_embed.net.anyio.getaddrinfo", resolve)
    port = web.base.rsplit(":", 1)[1]
    _, body = await _get(f"http://images.example.test:{port}/ok.png",
                         AddressPolicy(["images.example.test"]))
    assert body == PNG and calls == ["images.example.test"]
    assert web.requests == [(f"images.example.test:{port}", "/ok.png")]


# ----------------------------------------------------------------- the clients
async def test_one_client_per_loop_until_closed() -> None:
    clients = HttpClients(timeout=3.0)
    first = clients.get()
    assert clients.get() is first and first.timeout == httpx.Timeout(3.0)
    await clients.aclose()
    assert first.is_closed
    second = clients.get()
    assert second is not first and not second.is_closed
    await clients.aclose()


def test_each_event_loop_has_its_own_client() -> None:
    clients = HttpClients(timeout=1.0)

    async def client() -> httpx.AsyncClient:
        return clients.get()

    # A loop per call, as run_workflow runs them: a client never crosses loops.
    first, second = anyio.run(client), anyio.run(client)
    assert first is not second


async def test_clients_share_one_tls_context_and_keep_no_connection() -> None:
    async with new_client(1.0) as a, new_client(2.0) as b:
        pool_a = a._transport._pool  # type: ignore[attr-defined]
        pool_b = b._transport._pool  # type: ignore[attr-defined]
        assert pool_a._ssl_context is pool_b._ssl_context
        assert pool_a._max_keepalive_connections == 0
        assert not a.follow_redirects and not a.trust_env
