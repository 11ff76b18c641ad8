"""The webhook address policy: what a subscription may point at, and the connect-time check
that resolves the host itself and connects to the address it checked (DNS rebinding)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterable

import httpcore
import pytest

from fleetflow.webhook_network import AddressPolicy, RefusedAddress, VettedBackend

# the examples: the Temporal UI, cloud metadata, a private host, the Temporal frontend
# over IPv6 loopback, PostgreSQL by name
REFUSED = [
    "http://127.0.0.1:8233/api/v1/namespaces",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://[::1]:7233/",
    "http://localhost:5432/",
    # the same places written otherwise
    "http://2130706433/",
    "http://127.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://0.0.0.0:8000/",
    "http://224.0.0.1/",
    "http://[fe80::1]/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_loopback_private_link_local_multicast_and_unspecified_are_refused(url: str) -> None:
    with pytest.raises(RefusedAddress):
        await AddressPolicy().check_url(url)


async def test_public_addresses_pass_and_named_networks_are_allowed() -> None:
    await AddressPolicy().check_url("https://93.184.216.34/hook")
    allowed = AddressPolicy([ipaddress.ip_network("127.0.0.1/32")])
    await allowed.check_url("http://127.0.0.1:9000/hook")
    with pytest.raises(RefusedAddress):
        await allowed.check_url("http://127.0.0.2:9000/hook")  # only the network named
    await allowed.check_url("http://[::ffff:127.0.0.1]:9000/hook")  # the same address, in IPv6
    with pytest.raises(RefusedAddress, match=r"embeds 127\.0\.0\.2"):
        await allowed.check_url("http://[::ffff:127.0.0.2]:9000/hook")


@pytest.mark.parametrize("url", ["http://" + "a" * 70 + ".com/", "http://a..b/"])
async def test_a_host_dns_cannot_encode_is_refused_not_an_error(url: str) -> None:
    with pytest.raises(RefusedAddress, match="not a host name"):
        await AddressPolicy().check_url(url)


async def test_a_name_with_any_refused_address_is_refused() -> None:
    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.1.2.3"]

    with pytest.raises(RefusedAddress, match=r"hooks\.example\.com resolves to a private") as refused:
        await AddressPolicy(resolver=mixed).check_url("https://hooks.example.com/x")
    assert "10.1.2.3" not in str(refused.value)


class Inner(httpcore.AsyncNetworkBackend):
    """Records where it was asked to connect, and connects nowhere."""

    def __init__(self) -> None:
        self.connected: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append((host, port))
        return httpcore.AsyncNetworkStream()


async def test_connection_goes_to_the_checked_address_and_rebinding_is_refused() -> None:
    """A name that was public when subscribed and now resolves to loopback is refused at connect
    time; a public one is connected to by its checked address, never looked up again."""
    answers = [["93.184.216.34"], ["127.0.0.1"]]

    async def rebinding(host: str, port: int) -> list[str]:
        return answers.pop(0)

    inner = Inner()
    backend = VettedBackend(AddressPolicy(resolver=rebinding), inner)
    await backend.connect_tcp("hooks.example.com", 443)
    assert inner.connected == [("93.184.216.34", 443)]
    with pytest.raises(httpcore.ConnectError, match="resolves to a loopback address") as refused:
        await backend.connect_tcp("hooks.example.com", 443)
    assert "127.0.0.1" not in str(refused.value)
    assert inner.connected == [("93.184.216.34", 443)]


async def test_a_refused_name_does_not_tell_the_tenant_its_internal_address() -> None:
    """An attacker subscribing `http://postgres:5432/` (or reading the dead letter of a delivery
    refused at connect time) learns that the name is refused, not what the platform's DNS says
    it is: the answer is no map of the internal network."""

    async def internal(host: str, port: int) -> list[str]:
        return ["10.20.30.40"]

    policy = AddressPolicy(resolver=internal)
    with pytest.raises(RefusedAddress) as at_subscribe:
        await policy.check_url("http://postgres:5432/")
    with pytest.raises(httpcore.ConnectError) as at_connect:
        await VettedBackend(policy, Inner()).connect_tcp("postgres", 5432)
    for refused in (at_subscribe.value, at_connect.value):
        assert "postgres resolves to a private or reserved address" in str(refused)
        assert "10.20.30.40" not in str(refused)


async def test_a_tenant_whose_dns_never_answers_does_not_hold_up_other_lookups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lookup runs in a thread that cannot be stopped: when the POST deadline cancelled the
    wait, the delivery gave its slot back while its thread still hung, so a tenant whose names'
    DNS never answers took ever more threads (the loop's default pool has cpu + 4) until no
    lookup of any tenant could run. A delivery's slot now stays taken until its lookup ends,
    and lookups have their own pool, larger than the slots."""
    hanging = threading.Event()
    hung: list[str] = []

    def lookup(host: str, port: int, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
        if host.startswith("hang"):
            hung.append(host)
            hanging.wait(60)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    backend = VettedBackend(AddressPolicy(), Inner())
    slots: list[asyncio.Task[object]] = []
    try:
        for round_ in range(4):  # the attacker's 4 slots, each retried once its POST gave up
            slots = [t for t in slots if not t.done()]
            slots += [
                asyncio.create_task(backend.connect_tcp(f"hang{round_}-{i}.example", 80))
                for i in range(4 - len(slots))
            ]
            await asyncio.sleep(0.05)
            for task in slots:
                task.cancel()  # the POST deadline
            await asyncio.sleep(0.05)
        await asyncio.wait_for(backend.connect_tcp("hooks.example.com", 443), 20)
        assert len(hung) == 4  # one hanging thread per slot, however often the POST gave up
    finally:
        hanging.set()
        await asyncio.gather(*slots, return_exceptions=True)
