"""Address rules for every URL the node connects to on a tenant's behalf
(CONTRACT §2 "Input addresses", §4): live source URLs (`sources.*`) and
callback/webhook URLs (`delivery.*`).

Only public unicast addresses are allowed unless the operator opts in
(`allow_private`, or for sources `allowed_networks`). IPv6 forms that carry an
IPv4 address to the node (IPv4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96,
6to4 2002::/16) are judged by that IPv4 address, so 64:ff9b::7f00:1 is
loopback. A refusal never depends on what listens at the address: refused
addresses are never connected to.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

from .config import DeliverySettings, SourcesSettings
from .errors import AddressRefused, InputInvalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix


def parse_address(text: str) -> IPAddress | None:
    """An IP literal (brackets and an IPv6 zone id allowed), else None (a name)."""
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address reaches through translation or
    tunnelling: IPv4-mapped, NAT64 (well-known prefix) or 6to4."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.sixtofour


def is_public(ip: IPAddress) -> bool:
    """Public unicast: not private, loopback, link-local, shared (100.64/10),
    unique-local, unspecified, reserved or multicast; translated forms are
    judged by the IPv4 address they reach."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_public(inner)
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


@dataclass(frozen=True)
class AddressPolicy:
    section: str  # the settings section named in refusals: "sources" or "delivery"
    allow_private: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def for_sources(cls, settings: SourcesSettings) -> "AddressPolicy":
        return cls("sources", settings.allow_private, settings.networks())

    @classmethod
    def for_delivery(cls, settings: DeliverySettings) -> "AddressPolicy":
        return cls("delivery", settings.allow_private)

    def permits(self, ip: IPAddress) -> bool:
        if self.allow_private or is_public(ip):
            return True
        candidates = [a for a in (ip, embedded_ipv4(ip)) if a is not None]
        return any(a in net for a in candidates for net in self.allowed_networks if a.version == net.version)

    def how_to_allow(self) -> str:
        if self.section == "sources":
            return ("the operator must set sources.allow_private = true or list its network in "
                    "sources.allowed_networks to allow it")
        return f"the operator must set {self.section}.allow_private = true to allow it"

    def first_refused(self, addresses: Iterable[str]) -> IPAddress | None:
        """The first of `addresses` the policy does not permit, or None."""
        for address in addresses:
            ip = parse_address(address)
            if ip is not None and not self.permits(ip):
                return ip
        return None

    def refusal(self, field: str, host: str, ip: IPAddress) -> str:
        inner = embedded_ipv4(ip)
        shown = f"{ip} (which reaches {inner})" if inner is not None else str(ip)
        if parse_address(host) == ip:
            subject = f"{field} host {shown} is"
        else:
            subject = f"{field} host {host} resolves to {shown},"
        return f"{subject} a private, loopback or link-local address; {self.how_to_allow()}"


# --- resolution ---------------------------------------------------------------------------

def _addresses(infos: list[tuple]) -> list[str]:
    return [info[4][0] for info in infos]


async def resolve(host: str) -> list[str]:
    """Every address `host` resolves to (an IP literal resolves to itself); OSError when it does not resolve."""
    if parse_address(host) is not None:
        return [host]
    return _addresses(await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM))


def resolve_blocking(host: str) -> list[str]:
    if parse_address(host) is not None:
        return [host]
    return _addresses(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))


def hostname(url: str) -> str | None:
    """The URL's host, or None when it has none or is not a URL (e.g. an unclosed [IPv6 bracket)."""
    try:
        return urlsplit(url).hostname or None
    except ValueError:
        return None


def _host(url: str, field: str, error: type[InputInvalid]) -> str:
    host = hostname(url)
    if not host:
        raise error(f"{field} has no host", details={"field": field})
    return host


def _refuse(policy: AddressPolicy, field: str, host: str, addresses: list[str],
            error: type[InputInvalid]) -> None:
    ip = policy.first_refused(addresses)
    if ip is not None:
        raise error(policy.refusal(field, host, ip), details={
            "field": field, "host": host, "address": str(ip), "setting": f"{policy.section}.allow_private"})


async def check_host(url: str, field: str, policy: AddressPolicy,
                     error: type[InputInvalid] = AddressRefused) -> None:
    """Refuse (`error`) a URL whose host resolves to an address the policy does not permit."""
    if policy.allow_private:
        return
    host = _host(url, field, error)
    try:
        addresses = await resolve(host)
    except (OSError, UnicodeError):  # UnicodeError: a name IDNA cannot encode (empty or long label)
        raise error(f"{field} host {host} cannot be resolved", details={"field": field, "host": host}) from None
    _refuse(policy, field, host, addresses, error)


def check_host_blocking(url: str, field: str, policy: AddressPolicy) -> None:
    """`check_host` for threads (a live task's supervisor, before each connect)."""
    if policy.allow_private:
        return
    host = _host(url, field, AddressRefused)
    try:
        addresses = resolve_blocking(host)
    except (OSError, UnicodeError):
        raise AddressRefused(f"{field} host {host} cannot be resolved",
                             details={"field": field, "host": host}) from None
    _refuse(policy, field, host, addresses, AddressRefused)


# --- sources ------------------------------------------------------------------------------------

async def check_source_url(url: str, settings: SourcesSettings) -> None:
    """A stream `url` at start (422 when refused)."""
    await check_host(url, "url", AddressPolicy.for_sources(settings))


def source_admission(settings: SourcesSettings) -> Callable[[str], None]:
    """The check a live supervisor runs before every (re)connect."""
    policy = AddressPolicy.for_sources(settings)
    return lambda url: check_host_blocking(url, "url", policy)


# --- callbacks and webhooks ------------------------------------------------------------------------

def callback_form_problem(url: str, field: str) -> str | None:
    """What is wrong with a callback/webhook URL's form (scheme, host, credentials), or None."""
    host = hostname(url)
    if host is None or urlsplit(url).scheme not in ("http", "https"):
        return f"{field} must be an http:// or https:// URL"
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises for a port out of range
        host.encode("idna")
    except (ValueError, UnicodeError):  # a bad port, or a name IDNA cannot encode
        return f"{field} is not a valid URL"
    if parts.username or parts.password:
        return f"{field} must not contain credentials"
    return None


async def validate_callback_url(url: str, field: str, settings: DeliverySettings) -> str:
    """A callback/webhook URL when a request gives it: http(s), no credentials,
    and (unless the operator allows it) only public addresses (400 when refused)."""
    problem = callback_form_problem(url, field)
    if problem is not None:
        raise InputInvalid(problem, details={"field": field})
    await check_host(url, field, AddressPolicy.for_delivery(settings), InputInvalid)
    return url


def send_time_problem(url: str, policy: AddressPolicy) -> str | None:
    """Checked before every delivery attempt, whatever was accepted when the URL
    was stored. IP literals are judged here because the HTTP client connects to
    them without asking the resolver; names are judged by `PolicyResolver` on
    the addresses really connected to."""
    problem = callback_form_problem(url, "url")
    if problem is not None:
        return f"refused: {problem}"
    host = hostname(url) or ""
    if parse_address(host) is None:
        return None
    ip = policy.first_refused([host])
    return None if ip is None else f"refused: {policy.refusal('url', host, ip)}"


class PolicyResolver(AbstractResolver):
    """The delivery client's resolver: drops addresses the policy does not
    permit, so what is connected to is what was checked (DNS may change between
    validation and sending)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._inner = ThreadedResolver()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        hosts = await self._inner.resolve(host, port, family)
        ip = self._policy.first_refused(h["host"] for h in hosts)
        if ip is not None:
            # errno + strerror: aiohttp shows strerror in the error it raises
            raise OSError(errno.EACCES, f"refused: {self._policy.refusal('url', host, ip)}")
        return hosts

    async def close(self) -> None:
        await self._inner.close()
