"""Paths where traffic that policy denies used to get through, each checked with real TCP.

The topology and the enforcer harness are ``test_traffic``'s: pods A and B on veth pairs to
a forwarding node, an outside namespace with servers on 10.66.x (ports 80, 443, 6443).
Each test here failed on the enforcer before the fix it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.dataplane.conftest import Netns
from tests.dataplane.test_traffic import (
    NODE,
    OUTSIDE_IPS,
    OUTSIDE_IPS6,
    PORTS,
    Node,
    Topology,
    World,
    add_ipv6,
    build_topology,
)
from topics.records import DEFAULT_ALLOW_PROFILE

NETNS_PREFIX = "pc-fo-"

DENY_SOME = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-some}
spec:
  selector: app == 'billing'
  types: [Egress]
  egress:
  - {action: Deny, protocol: TCP, destination: {nets: [10.66.3.0/24]}}
  - {action: Allow, protocol: TCP, destination: {nets: [10.66.0.0/16], notNets: [10.66.2.0/24]}}
"""


@pytest.fixture
def topology(make_netns: Callable[[], Netns]) -> Iterator[Topology]:
    topo = build_topology(make_netns)
    try:
        yield topo
    finally:
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def _matrix_agrees(topo: Topology, world: World, source_ns: str, key: str) -> int:
    """Every outside address x port connects from `source_ns` iff policy.verdict allows it
    for endpoint `key`; returns how many connected."""
    got = topo.matrix([source_ns])
    wrong = [(case, ok) for case, ok in got.items()
             if ok != world.expected(key, case[1], case[2])]
    assert not wrong, f"connections that disagree with policy.verdict: {wrong}"
    return sum(got.values())


def test_traffic_from_an_unknown_workload_interface_is_dropped(topology: Topology) -> None:
    """A pod whose interface exists before its endpoint is known (the CNI is faster than
    the watcher) is denied until its policy is programmed: Calico's "unknown interface"."""
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    node = Node(topology, world, prefixes=("veth",))
    node.sync()
    assert topology.connect("pod-a", "10.66.0.2", 80)  # known, no policy: allowed
    assert not topology.connect("pod-b", "10.66.0.2", 80)  # veth-b: nobody's yet
    assert not topology.connect("pod-b", "10.65.1.1", 8080)  # nor to the node itself
    world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "web"}, "veth-b")
    node.sync()
    assert topology.connect("pod-b", "10.66.0.2", 80)
    world.delete_endpoint("pod/shop/b")
    node.sync()
    assert not topology.connect("pod-b", "10.66.0.2", 80)  # gone again: dropped again
    node.ipsets.close()


def test_a_vm_enforcing_itself_filters_what_it_sends_and_forwards(topology: Topology) -> None:
    """A ``kind: vm`` file whose node is the VM itself: the enforcer runs in the VM (here:
    the node namespace), and its egress is what it sends out of its interfaces (OUTPUT)
    and what it forwards out of them (FORWARD, e.g. its containers': pod A stands for
    one). Before, it was dispatched like a hypervisor's tap (``-i``) and nothing matched."""
    world = World()
    vm = world.put_endpoint("vm", None, NODE, ("10.66.0.1",), {"app": "billing"}, "to-out",
                            node=NODE)
    world.put_objects(DENY_SOME)
    node = Node(topology, world)
    node.sync()
    sent = _matrix_agrees(topology, world, "node", vm.key)
    forwarded = _matrix_agrees(topology, world, "pod-a", vm.key)
    assert not topology.connect("node", "10.66.3.1", 443)
    assert not topology.connect("pod-a", "10.66.3.1", 443)
    assert topology.connect("node", "10.66.1.1", 443)
    assert 0 < sent < len(OUTSIDE_IPS) * len(PORTS) and forwarded == sent
    node.ipsets.close()


def test_a_vm_with_two_interfaces_on_a_hypervisor_is_enforced_on_both(
    topology: Topology,
) -> None:
    """Pods A and B stand for one VM's two taps on the hypervisor (the node). Before, a
    VM with several interfaces got ``-i *``, which iptables reads as a literal name."""
    world = World()
    vm = world.put_endpoint("vm", None, "billing-1", ("10.65.1.2", "10.65.2.2"),
                            {"app": "billing"}, "veth-a,veth-b", node=NODE)
    world.put_objects(DENY_SOME)
    node = Node(topology, world)
    node.sync()
    for tap in ("pod-a", "pod-b"):
        assert _matrix_agrees(topology, world, tap, vm.key) > 0
        assert not topology.connect(tap, "10.66.3.1", 80)
        assert not topology.connect(tap, "10.66.2.1", 443)
    node.ipsets.close()


def test_a_host_endpoint_with_the_default_allow_profile_allows_what_no_policy_decides(
    topology: Topology,
) -> None:
    """Automatic host endpoints carry Calico's default-allow profile: turning them on must
    not default-deny every node's egress. Without the profile a host endpoint denies."""
    world = World()
    hep = world.put_endpoint("hostendpoint", None, "node-1-auto-hep", ("10.66.0.1",),
                             {"host": "yes"}, "*", profiles=(DEFAULT_ALLOW_PROFILE,))
    node = Node(topology, world)
    node.sync()
    assert _matrix_agrees(topology, world, "node", hep.key) == len(OUTSIDE_IPS) * len(PORTS)
    # a policy that applies ends its tier with a Deny: the profile does not undo that
    world.put_objects(DENY_SOME.replace("app == 'billing'", "has(host)"))
    node.sync()
    assert not topology.connect("node", "10.66.3.1", 80)
    assert not topology.connect("node", "10.66.2.1", 80)  # end of tier
    assert topology.connect("node", "10.66.1.1", 80)
    _matrix_agrees(topology, world, "node", hep.key)
    # and without the profile, what no policy decides is denied (failsafe ports aside)
    world.delete_object("GlobalNetworkPolicy//deny-some")
    hep = world.put_endpoint("hostendpoint", None, "node-1-auto-hep", ("10.66.0.1",),
                             {"host": "yes"}, "*")
    node.sync()
    assert not topology.connect("node", "10.66.0.2", 80)
    assert topology.connect("node", "10.66.0.2", 6443)
    _matrix_agrees(topology, world, "node", hep.key)
    node.ipsets.close()


def test_ipv6_of_a_node_that_does_not_enforce_it_is_dropped(topology: Topology) -> None:
    """``enforce --no-ipv6``: IPv6 from local endpoints is dropped, never left open; IPv4
    follows policy as usual, and neighbour discovery still works (IPv6 would not flow
    otherwise, and the drop would prove nothing)."""
    add_ipv6(topology)
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2", "fd65:1::2"), {"app": "web"},
                       "veth-a")
    world.put_endpoint("pod", "shop", "b", ("10.65.2.2", "fd65:2::2"), {"app": "web"},
                       "veth-b")
    probe = Node(topology, world, ipv6=True)
    probe.sync()
    assert all(topology.connect6("pod-a", ip6, 80) for ip6 in OUTSIDE_IPS6)  # enforced: open
    probe.programmer.iptables.remove_all()  # type: ignore[union-attr]
    probe.planes[1][1].iptables.remove_all()  # type: ignore[union-attr]
    probe.ipsets.close()

    node = Node(topology, world, blocked6=True)
    world.published = {}  # a fresh enforcer reads every record again
    world.pending = [("endpoints", key, rec) for key, rec in world.endpoints.items()]
    node.sync()
    assert topology.connect("pod-a", "10.66.0.2", 80)
    for source in ("pod-a", "pod-b"):
        assert not any(topology.connect6(source, ip6, port)
                       for ip6 in OUTSIDE_IPS6 for port in (80, 443))
    node.ipsets.close()


def test_a_host_endpoint_given_by_its_ip_is_enforced_on_the_interface_holding_it(
    topology: Topology,
) -> None:
    """A HostEndpoint with expectedIPs and no interfaceName stands for the interface that
    holds one of them (Calico's rule); before, it was not enforced at all."""
    world = World()
    hep = world.put_endpoint("hostendpoint", None, "node-1-uplink", ("10.66.0.1", "10.99.0.1"),
                             {"host": "yes"}, None)
    node = Node(topology, world)
    node.sync()
    assert node.state.endpoints[hep.key].interface == "to-out"
    assert not topology.connect("node", "10.66.0.2", 80)  # default deny of a host endpoint
    assert topology.connect("node", "10.66.0.2", 6443)  # failsafe
    _matrix_agrees(topology, world, "node", hep.key)
    # the address moves to another interface: the endpoint follows it
    topology.node.run("ip", "addr", "add", "10.99.0.1/32", "dev", "veth-a")
    assert node.sink.rebind()
    node.sync()
    assert node.state.endpoints[hep.key].interface == "to-out,veth-a"
    assert not node.sink.rebind()  # nothing moved since
    topology.node.run("ip", "addr", "del", "10.66.0.1/24", "dev", "to-out")
    assert node.sink.rebind()
    node.sync()
    assert node.state.endpoints[hep.key].interface == "veth-a"
    node.ipsets.close()
