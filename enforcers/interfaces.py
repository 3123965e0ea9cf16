"""Which of the node's interfaces hold which addresses (for host endpoints given by IP).

A Calico HostEndpoint may name no interface, only ``expectedIPs``: it stands for the
interface(s) of its node that hold one of them. The enforcer reads the node's addresses
with pyroute2 (netlink) in its namespace, and binds such endpoints to interfaces by the
pure ``interfaces_holding``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from enforcers import netns as netns_mod

#: Interface name -> the addresses it holds (canonical text).
Addresses = Mapping[str, frozenset[str]]


def interfaces_holding(addresses: Addresses, ips: Iterable[str]) -> str | None:
    """The interfaces (comma-separated, sorted) holding any of `ips`; None if none does.
    Loopback never counts: a host endpoint is about traffic that leaves the node."""
    wanted = {str(ipaddress.ip_address(ip.split("/")[0])) for ip in ips}
    names = sorted(name for name, held in addresses.items()
                   if name != "lo" and held & wanted)
    return ",".join(names) if names else None


def read_addresses(netns: str | None = None) -> dict[str, frozenset[str]]:
    """The addresses of every interface in `netns` (None: this namespace), by netlink."""

    def read() -> dict[str, frozenset[str]]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            held: dict[str, set[str]] = {}
            for addr in ipr.get_addr():
                local = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
                name = names.get(addr["index"])
                if local and name:
                    held.setdefault(name, set()).add(str(ipaddress.ip_address(local)))
        return {name: frozenset(ips) for name, ips in held.items()}

    return netns_mod.run_in(netns, read)
