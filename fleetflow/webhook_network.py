"""Where webhooks may go: the address policy, checked when a subscription is made and again on
every connection, against the address actually connected to.

A webhook URL is chosen by a tenant, and the platform POSTs to it from inside its own network:
without a policy, `http://127.0.0.1:8233/` or `http://169.254.169.254/` reach the Temporal UI or
a cloud metadata service (server-side request forgery). Loopback, private, link-local,
multicast, reserved and unspecified addresses are refused unless the operator names their
network (`FLEETFLOW_WEBHOOK_ALLOW_NETWORKS`). A name is resolved when the connection is made and
the connection goes to the address that was checked, so a name that resolves to a public
address at subscribe time and to a private one later (DNS rebinding) is still refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import httpcore
import httpx

from fleetflow.settings import Settings, parse_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

WEBHOOK_TIMEOUT = httpx.Timeout(10.0, connect=3.0)
# a subscribe-time lookup that takes longer is left to the connect-time check
SUBSCRIBE_RESOLVE_S = 3.0
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class RefusedAddress(ValueError):
    """A webhook URL whose host is, or resolves to, an address the policy refuses."""


# lookups run in threads of their own, not the loop's default pool (cpu + 4 threads): twice
# the default webhook slots (32), so a delivery's lookup does not wait for a thread
_LOOKUPS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="webhook-dns")


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address host resolves to (the system resolver, off the event loop)."""
    infos = await asyncio.get_running_loop().run_in_executor(
        _LOOKUPS, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _to_the_end(work: Awaitable[list[str]]) -> list[str]:
    """Await work; when cancelled meanwhile, wait for it to end first, then be cancelled. A
    lookup's thread cannot be stopped: a delivery whose POST deadline passed keeps its slot
    until the thread is free again, so a tenant whose DNS never answers holds no more
    lookup threads than it has slots."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # however often it is cancelled (a deadline, then the activity)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
        raise


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _kind_of(refusal: str) -> str:
    """What a refusal says of an address, without the address ("a loopback address")."""
    return refusal.rsplit(" is ", 1)[-1] if " is " in refusal else "an address webhooks may not reach"


class AddressPolicy:
    """Public unicast addresses, plus the networks the operator allows."""

    def __init__(self, allowed: Iterable[Network] = (), resolver: Resolver = system_resolver) -> None:
        self.allowed = tuple(allowed)
        self.resolver = resolver

    @classmethod
    def from_settings(cls, settings: Settings) -> AddressPolicy:
        """The policy of `FLEETFLOW_WEBHOOK_ALLOW_NETWORKS`."""
        text = settings.webhook_allow_networks
        return cls(parse_networks(text) if text else ())

    def refusal(self, address: str) -> str | None:
        """Why address may not be reached, or None when it may."""
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return f"{address!r} is not an IP address"
        if any(ip in network for network in self.allowed):
            return None
        if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_v4(ip)) is not None:
            # it reaches what the IPv4 address reaches, and is judged as that address
            why = self.refusal(str(v4))
            return None if why is None else f"{ip} embeds {v4}: {why}"
        if ip.is_unspecified:
            return f"{ip} is an unspecified address"
        if ip.is_loopback:
            return f"{ip} is a loopback address"
        if ip.is_link_local:
            return f"{ip} is a link-local address"
        if ip.is_multicast:
            return f"{ip} is a multicast address"
        if ip.is_private or ip.is_reserved or not ip.is_global:
            return f"{ip} is a private or reserved address"
        return None

    async def vetted(self, host: str, port: int) -> list[str]:
        """The addresses of host, when every one of them is allowed; RefusedAddress if any is not
        (a name with one private address among public ones is refused, not half-trusted)."""
        host = host.strip("[]")
        literal = True
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            literal, addresses = False, await self.resolver(host, port)
        if not addresses:
            raise RefusedAddress(f"{host} resolves to no address")
        for address in addresses:
            if (why := self.refusal(address)) is not None:
                # a name's address is not shown: the answer would tell a tenant what the
                # platform's internal DNS holds (a map of its network, one name at a time)
                shown = why if literal else f"{host} resolves to {_kind_of(why)}"
                raise RefusedAddress(f"{shown}; webhooks go to public addresses only")
        return addresses

    async def check_url(self, url: str) -> None:
        """Subscribe-time check of a webhook URL: RefusedAddress when its host is, or now
        resolves to, a refused address. A name that does not resolve yet is accepted; every
        connection checks again."""
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise RefusedAddress(f"not a URL webhooks can reach: {exc}") from None
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            async with asyncio.timeout(SUBSCRIBE_RESOLVE_S):
                await self.vetted(parsed.host, port)
        except RefusedAddress:
            raise
        except ValueError:  # e.g. a label too long for DNS: no connection could ever be made
            raise RefusedAddress(f"{parsed.host!r} is not a host name DNS can resolve") from None
        except (OSError, TimeoutError):
            return


class VettedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that resolves each host itself, checks every address with the policy
    and connects to a checked address only (TLS still verifies the URL's host name)."""

    def __init__(self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first reachable vetted address of host."""
        try:
            addresses = await _to_the_end(self.policy.vetted(host, port))
        except RefusedAddress as exc:
            raise httpcore.ConnectError(str(exc)) from None
        except (OSError, ValueError) as exc:  # no such name; a name DNS cannot encode
            raise httpcore.ConnectError(f"{host}: {exc}") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Never: webhooks are TCP."""
        raise httpcore.ConnectError("webhooks do not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        """As the inner backend sleeps."""
        await self.inner.sleep(seconds)


class VettedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a VettedBackend; no proxy from the environment (a proxy would
    connect for us, past the check)."""

    def __init__(self, policy: AddressPolicy, limits: httpx.Limits | None = None) -> None:
        limits = limits or httpx.Limits()
        super().__init__(trust_env=False, limits=limits)
        # httpx takes no network backend: its pool is rebuilt with one, configured the same
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=self._pool._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=VettedBackend(policy),
        )


def webhook_client(policy: AddressPolicy, limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    """The outbound client of webhook deliveries: every connection vetted, no redirects
    followed, no environment proxies."""
    return httpx.AsyncClient(
        transport=VettedTransport(policy, limits),
        timeout=WEBHOOK_TIMEOUT,
        follow_redirects=False,
        trust_env=False,
    )
