"""Binding host endpoints given by IPs to the interfaces that hold them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from enforcers.interfaces import interfaces_holding

IPS = ["10.0.0.1", "10.0.0.2", "fd00::1", "127.0.0.1"]
NAMES = ["eth0", "eth1", "bond0", "lo"]


@given(st.dictionaries(st.sampled_from(NAMES), st.frozensets(st.sampled_from(IPS))),
       st.lists(st.sampled_from(IPS), min_size=1))
def test_the_interfaces_holding_any_wanted_ip_and_never_loopback(
    addresses: dict[str, frozenset[str]], wanted: list[str]
) -> None:
    got = interfaces_holding(addresses, wanted)
    expected = sorted(n for n, held in addresses.items() if n != "lo" and held & set(wanted))
    assert got == (",".join(expected) if expected else None)


def test_addresses_are_compared_canonically() -> None:
    assert interfaces_holding({"eth0": frozenset({"fd00::1"})}, ["FD00:0::1"]) == "eth0"
