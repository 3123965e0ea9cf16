"""The shipped examples load, behave as their comments say, and the broken variants fail
exactly where their ``# expect:`` header says."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy import HostEndpoint, NetworkSet, Policy, PolicyError, Tier, dump, load
from policy.compile import arrange
from policy.labels import endpoint_labels, host_endpoint_labels, network_set_labels
from policy.verdict import Endpoint, Packet, Peer, verdict

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOOD = sorted(EXAMPLES.glob("*.yaml"))
BROKEN = sorted((EXAMPLES / "broken").glob("*.yaml"))


def _load(name: str) -> list[object]:
    path = EXAMPLES / name
    return load(path.read_text(), str(path))


def _pod(namespace: str, **labels: str) -> Endpoint:
    return Endpoint(
        "workload",
        endpoint_labels(
            labels,
            namespace=namespace,
            namespace_labels={},
            service_account="default",
            service_account_labels={},
        ),
        ip="10.244.1.10",
    )


KUBE_DNS = Peer(
    ip="10.244.0.2",
    label_sets=(
        endpoint_labels({"k8s-app": "kube-dns"}, namespace="kube-system", namespace_labels={}),
    ),
)


def test_every_example_is_present() -> None:
    names = {p.name for p in GOOD}
    assert names >= {
        "default-deny.yaml",
        "global-deny-all-except-kube-dns.yaml",
        "saas-networkset.yaml",
        "host-endpoint.yaml",
    }
    assert len(BROKEN) >= 4


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_example_loads_and_round_trips(path: Path) -> None:
    objects = load(path.read_text(), str(path))
    assert objects
    assert load(dump(objects)) == objects


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.name)
def test_broken_example_fails_at_the_expected_path(path: Path) -> None:
    text = path.read_text()
    expected = text.splitlines()[0].removeprefix("# expect: ")
    assert expected != text.splitlines()[0], "broken examples start with '# expect: ...'"
    with pytest.raises(PolicyError) as caught:
        load(text, str(path))
    message = str(caught.value)
    assert f"{path}: {expected}" in message, message


def test_default_deny_allows_dns_only() -> None:
    objects = _load("default-deny.yaml")
    tiers = arrange([], [o for o in objects if isinstance(o, Policy)])
    pod = _pod("prod", app="web")
    assert verdict(pod, tiers, Packet("UDP", KUBE_DNS, port=53)).allowed
    assert verdict(pod, tiers, Packet("TCP", KUBE_DNS, port=53)).allowed
    assert not verdict(pod, tiers, Packet("TCP", KUBE_DNS, port=80)).allowed
    internet = Peer(ip="93.184.216.34")
    denied = verdict(pod, tiers, Packet("TCP", internet, port=443))
    assert denied.action == "deny" and denied.tier == "default" and denied.policy is None
    # Other namespaces are untouched.
    assert verdict(_pod("dev", app="web"), tiers, Packet("TCP", internet, port=443)).allowed


def test_global_deny_spares_system_namespaces() -> None:
    objects = _load("global-deny-all-except-kube-dns.yaml")
    tiers = arrange([], [o for o in objects if isinstance(o, Policy)])
    internet = Peer(ip="93.184.216.34")
    assert not verdict(_pod("prod", app="web"), tiers, Packet("TCP", internet, port=443)).allowed
    assert verdict(_pod("prod", app="web"), tiers, Packet("UDP", KUBE_DNS, port=53)).allowed
    assert verdict(_pod("kube-system", app="x"), tiers, Packet("TCP", internet, port=443)).allowed


def test_saas_network_set_reaches_by_cidr_and_by_domain() -> None:
    objects = _load("saas-networkset.yaml")
    (saas,) = [o for o in objects if isinstance(o, NetworkSet)]
    tiers = arrange([], [o for o in objects if isinstance(o, Policy)])
    saas_labels = network_set_labels(dict(saas.labels), None)
    billing = _pod("prod", app="billing")
    by_cidr = Peer(ip="203.0.113.9", label_sets=(saas_labels,))
    allowed = verdict(billing, tiers, Packet("TCP", by_cidr, port=443))
    assert allowed.allowed and allowed.policy == "NetworkPolicy/prod/billing-to-saas"
    assert not verdict(billing, tiers, Packet("TCP", by_cidr, port=80)).allowed
    by_domain = Peer(
        ip="192.0.2.7", domain_label_sets=(saas_labels,), domains=("x.api.example.net",)
    )
    assert verdict(billing, tiers, Packet("TCP", by_domain, port=443)).allowed
    # Billing pods in another namespace are not selected by the namespaced policy.
    assert verdict(
        _pod("dev", app="billing"), tiers, Packet("TCP", Peer("8.8.8.8"), port=1)
    ).allowed


def test_host_endpoint_policy_and_failsafes() -> None:
    objects = _load("host-endpoint.yaml")
    (hep,) = [o for o in objects if isinstance(o, HostEndpoint)]
    tiers = arrange(
        [o for o in objects if isinstance(o, Tier)], [o for o in objects if isinstance(o, Policy)]
    )
    host = Endpoint("host", host_endpoint_labels(dict(hep.labels)), ip=hep.expected_ips[0])
    mirror = Peer(ip="10.0.3.4")
    assert verdict(host, tiers, Packet("TCP", mirror, port=443)).allowed
    assert verdict(host, tiers, Packet("TCP", mirror, port=5001)).allowed
    denied = verdict(host, tiers, Packet("TCP", Peer(ip="93.184.216.34"), port=443))
    assert (denied.action, denied.rule_index) == ("deny", 2)
    # Failsafe outbound ports win over the Deny rule.
    assert verdict(host, tiers, Packet("TCP", Peer(ip="93.184.216.34"), port=6443)).allowed
    # A host that no policy selects is default-deny (apart from failsafes).
    other = Endpoint("host", {"role": "db"})
    assert not verdict(other, tiers, Packet("TCP", mirror, port=443)).allowed
    assert verdict(other, tiers, Packet("UDP", mirror, port=53)).allowed
