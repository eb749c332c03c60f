"""Source address of a request, believing ``X-Forwarded-For`` only from trusted proxies."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.strip())
    except ValueError:
        return None


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    parsed = _parse(address)
    return parsed is not None and any(parsed in network for network in trusted)


def parse_networks(cidrs: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Networks from CIDR strings already validated when they were saved."""
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def address_allowed(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    """No networks means any address; otherwise the address must be in one of them."""
    if not networks:
        return True
    parsed = _parse(address) if address else None
    return parsed is not None and any(parsed in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str | None:
    """The caller's address.

    When the TCP peer is a trusted proxy, walk ``X-Forwarded-For`` from the right (the entry
    the nearest proxy appended) past every trusted hop; the first untrusted entry is the
    client. Entries a client wrote itself sit to the left of that and are never believed.
    """
    if peer is None or not trusted or not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    address = peer
    for hop in reversed(hops):
        if _parse(hop) is None:
            break
        address = hop
        if not _trusted(hop, trusted):
            break
    return address
