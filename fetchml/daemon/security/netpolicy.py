"""Who may connect over TCP: the client's real address (proxies), the IP allowlist, Origin."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from fetchml.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(values: Iterable[str], setting: str) -> list[IPNetwork]:
    networks: list[IPNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise ConfigError(f"{setting}: {value!r} is not an address or CIDR network") from exc
    return networks


def parse_address(text: str) -> IPAddress | None:
    """An address, with IPv4-mapped IPv6 (::ffff:1.2.3.4) turned into plain IPv4."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]").split("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


class NetworkPolicy:
    def __init__(self, allowlist: Iterable[str], trusted_proxies: Iterable[str],
                 allowed_origins: Iterable[str]) -> None:
        self.allowlist = parse_networks(allowlist, "ip_allowlist")
        self.trusted = parse_networks(trusted_proxies, "trusted_proxies")
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    def client_address(self, peer: str | None, forwarded_for: str | None) -> IPAddress | None:
        """The peer, or — only when the peer is a trusted proxy — the nearest untrusted hop of
        X-Forwarded-For (a client can forge the header, never the TCP peer)."""
        address = parse_address(peer or "")
        if address is None or not forwarded_for or not _within(address, self.trusted):
            return address
        for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
            hop_address = parse_address(hop)
            if hop_address is None:
                return None
            if not _within(hop_address, self.trusted):
                return hop_address
        return address

    def is_trusted_proxy(self, address: IPAddress | None) -> bool:
        return address is not None and _within(address, self.trusted)

    def allows(self, address: IPAddress | None) -> bool:
        return address is not None and _within(address, self.allowlist)

    def origin_allowed(self, origin: str | None) -> bool:
        """No Origin (CLI, scripts) is fine; a browser's Origin must be listed."""
        return origin is None or origin.rstrip("/").lower() in self.origins
