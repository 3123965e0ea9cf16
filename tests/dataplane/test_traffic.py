"""Real traffic through the programmed dataplane: every connection as ``policy.verdict`` says.

Topology (all namespaces created and removed by the test, names ``pc-tr-*``)::

    pod A 10.65.1.2 ──veth-a──┐
                              node (forwarding) ──to-out── outside 10.66.0.2, 10.66.1.1,
    pod B 10.65.2.2 ──veth-b──┘    10.66.0.1                10.66.2.1, 10.66.3.1
                                                            TCP servers on 80, 443, 6443
    (and a server on the node itself, port 8080)

The test plays the stream processor (``World`` computes memberships from endpoints and
policies with ``policy.compile`` selectors), feeds the records through the enforcer's
record handling, state, planner and programmer into real ipsets and iptables in the node
namespace, and connects from the pods and from the node itself.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from enforcers import netns as netns_mod
from enforcers.engine import Programmer, RecordSink
from enforcers.interfaces import read_addresses
from enforcers.ipsets import NetlinkIpsets, set_name
from enforcers.iptables import Iptables
from enforcers.metrics import EnforcerMetrics
from enforcers.render import WORKLOAD_PREFIXES, FlowLog
from enforcers.state import EnforcerState
from policy import compile as pcompile
from policy import labels as plabels
from policy import verdict as pverdict
from policy.load import load
from policy.model import Policy, PolicyObject, Tier
from tests.dataplane.conftest import Netns
from topics import codec
from topics.records import (
    DEFAULT_ALLOW_PROFILE,
    EndpointRecord,
    MembershipRecord,
    PolicyRecord,
    membership_key,
)

NETNS_PREFIX = "pc-tr-"
NODE = "node-1"
PORTS = (80, 443, 6443)
OUTSIDE_IPS = ("10.66.0.2", "10.66.1.1", "10.66.2.1", "10.66.3.1")
CONNECT_TIMEOUT = 0.5
NODE_IP = "10.65.1.1"  # the node's end of pod A's veth
NODE_PORT = 8080  # a server on the node itself (pods reach it through INPUT, not FORWARD)


# --------------------------------------------------------------------------- the world


def _ip_in(ip: str, nets: tuple[str, ...]) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return any(addr in ipaddress.ip_network(n, strict=False) for n in nets)


@dataclass
class World:
    """Endpoints and policies, and the memberships the stream processor would derive."""

    endpoints: dict[str, EndpointRecord] = field(default_factory=dict)
    objects: dict[str, PolicyObject] = field(default_factory=dict)
    published: dict[str, MembershipRecord] = field(default_factory=dict)
    pending: list[tuple[str, str, object]] = field(default_factory=list)

    def put_endpoint(self, kind: str, namespace: str | None, name: str, ips: tuple[str, ...],
                     labels: dict[str, str], interface: str | None = None,
                     node: str | None = NODE, profiles: tuple[str, ...] = ()) -> EndpointRecord:
        rec = EndpointRecord(kind, namespace, name, node, interface, ips, labels, None,
                             "apply", time.time(), profiles=profiles)  # type: ignore[arg-type]
        self.endpoints[rec.key] = rec
        self.pending.append(("endpoints", rec.key, rec))
        return rec

    def delete_endpoint(self, key: str) -> None:
        del self.endpoints[key]
        self.pending.append(("endpoints", key, None))

    def put_objects(self, text: str) -> None:
        for obj in load(text):
            self.objects[obj.key] = obj
            doc = obj.to_document()
            rec = PolicyRecord(obj.kind, obj.namespace, obj.name, doc, "test", time.time(),
                               time.time())
            self.pending.append(("policies", rec.key, rec))

    def delete_object(self, key: str) -> None:
        del self.objects[key]
        self.pending.append(("policies", key, None))

    @staticmethod
    def labels_of(rec: EndpointRecord) -> dict[str, str]:
        if rec.kind == "pod":
            return plabels.endpoint_labels(rec.labels, namespace=rec.namespace)
        if rec.kind in ("networkset", "globalnetworkset"):
            return plabels.network_set_labels(rec.labels, rec.namespace)
        return plabels.host_endpoint_labels(rec.labels)

    def policies(self) -> list[Policy]:
        return [o for o in self.objects.values() if isinstance(o, Policy)]

    def tiers(self) -> list[Tier]:
        return [o for o in self.objects.values() if isinstance(o, Tier)]

    def memberships(self) -> dict[str, MembershipRecord]:
        out: dict[str, MembershipRecord] = {}
        selectors = {s for p in self.policies() for s in pcompile.all_selectors(p, ("Egress",))}
        for sel in selectors:
            for rec in self.endpoints.values():
                if sel.matches(self.labels_of(rec)):
                    m = MembershipRecord(sel.uid, rec.key, rec.namespace, rec.node,
                                         rec.interface, rec.ips, rec.observed_at)
                    out[m.key] = m
        return out

    def changes(self) -> list[tuple[str, str, object]]:
        """Records to deliver since the last call (policies and endpoints, then memberships)."""
        now = self.memberships()
        changes = self.pending
        self.pending = []
        for key, rec in now.items():
            if self.published.get(key) != rec:
                changes.append(("memberships", key, rec))
        for key in set(self.published) - set(now):
            changes.append(("memberships", key, None))
        self.published = now
        return changes

    def expected(self, source_key: str, dst: str, port: int) -> bool:
        src = self.endpoints[source_key]
        kind = "host" if src.kind == "hostendpoint" else "workload"
        endpoint = pverdict.Endpoint(kind, self.labels_of(src), src.ips[0] if src.ips else None)
        label_sets = tuple(
            self.labels_of(r) for r in self.endpoints.values() if r.ips and _ip_in(dst, r.ips)
        )
        packet = pverdict.Packet("TCP", pverdict.Peer(dst, label_sets), port=port)
        arranged = pcompile.arrange(self.tiers(), self.policies())
        default = "allow" if DEFAULT_ALLOW_PROFILE in src.profiles else None
        return pverdict.verdict(endpoint, arranged, packet, default_action=default).allowed


# --------------------------------------------------------------------------- topology


def ip(*args: str) -> None:
    import subprocess

    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"ip {' '.join(args)}: {proc.stderr}"


@dataclass
class Topology:
    node: Netns
    pods: dict[str, Netns]
    outside: Netns
    servers: list[socket.socket]
    stop: threading.Event

    def connect(self, source: str, dst: str, port: int) -> bool:
        """One TCP connection from a pod (``pod-a``) or the node (``node``); True if it opened."""
        ns = self.node.name if source == "node" else self.pods[source].name
        sock = netns_mod.open_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((dst, port))
            return True
        except (TimeoutError, ConnectionRefusedError, OSError):
            return False
        finally:
            sock.close()

    def connect6(self, source: str, dst: str, port: int) -> bool:
        ns = self.node.name if source == "node" else self.pods[source].name
        sock = netns_mod.open_socket(ns, socket.AF_INET6, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((dst, port))
            return True
        except (TimeoutError, ConnectionRefusedError, OSError):
            return False
        finally:
            sock.close()

    def matrix(self, sources: list[str]) -> dict[tuple[str, str, int], bool]:
        cases = [(s, d, p) for s in sources for d in OUTSIDE_IPS for p in PORTS]
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(lambda c: self.connect(*c), cases))
        return dict(zip(cases, results, strict=True))


def _serve(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (TimeoutError, OSError):
            continue
        with contextlib.suppress(OSError):
            conn.close()


def build_topology(make_netns: Callable[[], Netns]) -> Topology:
    node, pod_a, pod_b, outside = make_netns(), make_netns(), make_netns(), make_netns()
    for iface, pod, subnet in (("veth-a", pod_a, "10.65.1"), ("veth-b", pod_b, "10.65.2")):
        ip("-n", node.name, "link", "add", iface, "type", "veth", "peer", "name", "eth0",
           "netns", pod.name)
        ip("-n", node.name, "addr", "add", f"{subnet}.1/24", "dev", iface)
        ip("-n", node.name, "link", "set", iface, "up")
        ip("-n", pod.name, "addr", "add", f"{subnet}.2/24", "dev", "eth0")
        ip("-n", pod.name, "link", "set", "eth0", "up")
        ip("-n", pod.name, "route", "add", "default", "via", f"{subnet}.1")
    ip("-n", node.name, "link", "add", "to-out", "type", "veth", "peer", "name", "eth0",
       "netns", outside.name)
    ip("-n", node.name, "addr", "add", "10.66.0.1/24", "dev", "to-out")
    ip("-n", node.name, "link", "set", "to-out", "up")
    ip("-n", outside.name, "addr", "add", "10.66.0.2/24", "dev", "eth0")
    for extra in OUTSIDE_IPS[1:]:
        ip("-n", outside.name, "addr", "add", f"{extra}/32", "dev", "eth0")
    ip("-n", outside.name, "link", "set", "eth0", "up")
    ip("-n", outside.name, "route", "add", "default", "via", "10.66.0.1")
    ip("-n", node.name, "route", "add", "10.66.0.0/16", "via", "10.66.0.2")
    node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    stop = threading.Event()
    servers = []
    for ns, port in [(outside, p) for p in PORTS] + [(node, NODE_PORT)]:
        sock = netns_mod.open_socket(ns.name, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(256)
        servers.append(sock)
        threading.Thread(target=_serve, args=(sock, stop), daemon=True).start()
    return Topology(node, {"pod-a": pod_a, "pod-b": pod_b}, outside, servers, stop)


@pytest.fixture
def topology(make_netns: Callable[[], Netns]) -> Iterator[Topology]:
    topo = build_topology(make_netns)
    try:
        yield topo
    finally:
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


POLICIES = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-deny}
spec:
  order: 2000
  selector: has(projectcalico.org/namespace)
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination: {ports: [53]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: saas, labels: {kind: saas}}
spec: {nets: [10.66.1.0/24]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-to-saas, namespace: shop}
spec:
  order: 100
  selector: app == 'web'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination:
      selector: kind == 'saas'
      namespaceSelector: global()
      ports: [443]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: host-egress}
spec:
  order: 10
  selector: has(host)
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {nets: [10.66.2.0/24], ports: [80]}
  - action: Deny
    protocol: TCP
    destination: {nets: [10.66.3.0/24]}
"""


class Node:
    """The enforcer's pure core and programmers, fed record by record (no broker)."""

    def __init__(self, topo: Topology, world: World, ipv6: bool = False,
                 blocked6: bool = False, prefixes: tuple[str, ...] = WORKLOAD_PREFIXES,
                 flows: FlowLog | None = None) -> None:
        """``ipv6``: enforce IPv6 too (``blocked6``: drop it, as ``enforce --no-ipv6``);
        ``prefixes``: the workload interface prefixes (unknown ones are dropped);
        ``flows``: render flow-log rules."""
        self.world = world
        self.metrics = EnforcerMetrics()
        self.state = EnforcerState(NODE, set_name, workload_prefixes=prefixes, flows=flows)
        self.ipsets = NetlinkIpsets(netns=topo.node.name)
        self.iptables = Iptables(topo.node.name)
        self.programmer = Programmer(self.ipsets, self.iptables)
        self.planes = [(self.state, self.programmer)]
        if ipv6 or blocked6:
            self.planes.append((
                EnforcerState(NODE, lambda uid: set_name(uid, "pc6"), family=6,
                              workload_prefixes=prefixes, blocked=blocked6, flows=flows),
                Programmer(self.ipsets, Iptables(topo.node.name, family=6), family=6),
            ))
        self.sink = RecordSink(self.state, self.metrics, [p[0] for p in self.planes[1:]],
                               read_addresses=lambda: read_addresses(topo.node.name))
        self.started = False

    def sync(self) -> None:
        for suffix, key, rec in self.world.changes():
            value = codec.encode(rec) if rec is not None else None  # type: ignore[arg-type]
            self.sink.message(suffix, key.encode(), value)
        for state, programmer in self.planes:
            if not self.started:
                programmer.start(state)
            else:
                programmer.apply(state.plan())
        self.started = True
        assert self.metrics.rejected.value == 0


def check_matrix(topo: Topology, world: World, sources: dict[str, str]) -> int:
    """Every source x destination x port connects iff policy.verdict allows it."""
    got = topo.matrix(list(sources))
    wrong = [
        (case, ok) for case, ok in got.items()
        if ok != world.expected(sources[case[0]], case[1], case[2])
    ]
    assert not wrong, f"connections that disagree with policy.verdict: {wrong}"
    return sum(got.values())


def test_connections_follow_policy_verdict_through_every_change(topology: Topology) -> None:
    world = World()
    a = world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    b = world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "batch"}, "veth-b")
    hep = world.put_endpoint("hostendpoint", None, "node-1-out", ("10.66.0.1",),
                             {"host": "yes"}, "to-out")
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/24",), {"kind": "saas"},
                       node=None)
    # the remote pod on another node is not ours to enforce
    world.put_endpoint("pod", "shop", "far", ("10.77.0.1",), {"app": "web"}, "veth-far",
                       node="node-2")
    world.put_objects(POLICIES)
    node = Node(topology, world)
    sources = {"pod-a": a.key, "pod-b": b.key, "node": hep.key}

    node.sync()
    allowed = check_matrix(topology, world, sources)
    # sanity: the policies allow something and deny something for each kind of source
    assert topology.connect("pod-a", "10.66.1.1", 443)
    assert not topology.connect("pod-a", "10.66.1.1", 80)
    assert not topology.connect("pod-b", "10.66.1.1", 443)
    assert topology.connect("node", "10.66.2.1", 80)
    assert topology.connect("node", "10.66.3.1", 6443)  # failsafe beats the Deny rule
    assert not topology.connect("node", "10.66.3.1", 443)
    assert 0 < allowed < 36
    # egress policy covers pod traffic to the node's own addresses too
    assert not world.expected(a.key, NODE_IP, NODE_PORT)
    assert not topology.connect("pod-a", NODE_IP, NODE_PORT)

    # label pod B in: it reaches the SaaS set; out again: it does not
    b = world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "web"}, "veth-b")
    node.sync()
    assert topology.connect("pod-b", "10.66.1.1", 443)
    check_matrix(topology, world, sources)
    world.put_endpoint("pod", "shop", "b", ("10.65.2.2",), {"app": "batch"}, "veth-b")
    node.sync()
    assert not topology.connect("pod-b", "10.66.1.1", 443)

    # the network set's nets change: the set follows
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.3.0/24",), {"kind": "saas"},
                       node=None)
    node.sync()
    assert topology.connect("pod-a", "10.66.3.1", 443)
    assert not topology.connect("pod-a", "10.66.1.1", 443)
    check_matrix(topology, world, sources)

    # resync: a set member and a rule deleted by hand come back
    web_to_saas = world.objects["NetworkPolicy/shop/web-to-saas"]
    assert isinstance(web_to_saas, Policy)
    saas_selector = pcompile.policy_selectors(web_to_saas).egress[0].destination.selector
    assert saas_selector is not None
    saas_uid = saas_selector.uid
    topology.node.run("ipset", "del", set_name(saas_uid), "10.66.3.0/24")
    assert not topology.connect("pod-a", "10.66.3.1", 443)
    topology.node.run("iptables", "-D", "pc-fwd", "1")  # pod A's dispatch rule
    assert topology.connect("pod-a", "10.66.0.2", 80)  # unenforced now
    repairs = node.programmer.resync(node.state).repairs
    assert repairs >= 2
    assert topology.connect("pod-a", "10.66.3.1", 443)
    assert not topology.connect("pod-a", "10.66.0.2", 80)
    assert node.programmer.resync(node.state).repairs == 0

    # policy deleted: the pod falls back to the default-deny; that deleted too: allowed
    world.delete_object("NetworkPolicy/shop/web-to-saas")
    node.sync()
    assert not topology.connect("pod-a", "10.66.3.1", 443)
    check_matrix(topology, world, sources)
    world.delete_object("GlobalNetworkPolicy//default-deny")
    node.sync()
    assert topology.connect("pod-a", "10.66.0.2", 80)
    assert world.expected(a.key, NODE_IP, NODE_PORT)
    assert topology.connect("pod-a", NODE_IP, NODE_PORT)
    check_matrix(topology, world, sources)
    # no rule refers to the saas set any more: it is gone from the kernel
    assert set_name(saas_uid) not in node.ipsets.list_sets()

    # a restart from scratch over the programmed dataplane changes nothing that matters
    fresh = Node(topology, world)
    world.published = {}
    world.pending = [("endpoints", k, r) for k, r in world.endpoints.items()]
    world.pending += [
        ("policies", k, PolicyRecord(o.kind, o.namespace, o.name, o.to_document(), "t", 1.0, 1.0))
        for k, o in world.objects.items()
    ]
    fresh.sync()
    check_matrix(topology, world, sources)
    node.ipsets.close()
    fresh.ipsets.close()


def test_membership_keys_match_the_contract() -> None:
    world = World()
    world.put_endpoint("pod", "shop", "a", ("10.65.1.2",), {"app": "web"}, "veth-a")
    world.put_objects(POLICIES)
    keys = {k for s, k, _ in world.changes() if s == "memberships"}
    assert all(k == membership_key(*k.split("|", 1)) for k in keys)


OUTSIDE_IPS6 = ("fd66::2", "fd66:1::1", "fd66:2::1")


def add_ipv6(topo: Topology) -> None:
    """IPv6 beside IPv4: pods fd65:N::2, outside fd66::2 plus two more, servers on 80/443."""
    node, outside = topo.node.name, topo.outside.name
    for iface, pod, n in (("veth-a", topo.pods["pod-a"], 1), ("veth-b", topo.pods["pod-b"], 2)):
        ip("-n", node, "addr", "add", f"fd65:{n}::1/64", "dev", iface, "nodad")
        ip("-n", pod.name, "addr", "add", f"fd65:{n}::2/64", "dev", "eth0", "nodad")
        ip("-n", pod.name, "-6", "route", "add", "default", "via", f"fd65:{n}::1")
    ip("-n", node, "addr", "add", "fd66::1/64", "dev", "to-out", "nodad")
    ip("-n", outside, "addr", "add", "fd66::2/64", "dev", "eth0", "nodad")
    for extra in OUTSIDE_IPS6[1:]:
        ip("-n", outside, "addr", "add", f"{extra}/128", "dev", "eth0", "nodad")
    ip("-n", outside, "-6", "route", "add", "default", "via", "fd66::1")
    ip("-n", node, "-6", "route", "add", "fd66::/16", "via", "fd66::2")
    topo.node.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    # link-local addresses stay tentative (duplicate address detection) for a moment, and
    # neighbour discovery waits for them: wait until no namespace has one left
    spaces = [topo.node, topo.outside, *topo.pods.values()]
    deadline = time.monotonic() + 10
    while any(ns.run("ip", "-6", "addr", "show", "tentative").stdout.strip() for ns in spaces):
        assert time.monotonic() < deadline, "IPv6 addresses still tentative after 10 s"
        time.sleep(0.1)
    for port in (80, 443):
        sock = netns_mod.open_socket(outside, socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(256)
        topo.servers.append(sock)
        threading.Thread(target=_serve, args=(sock, topo.stop), daemon=True).start()


def test_ipv6_follows_policy_through_the_same_code_path(topology: Topology) -> None:
    add_ipv6(topology)
    world = World()
    a = world.put_endpoint("pod", "shop", "a", ("10.65.1.2", "fd65:1::2"), {"app": "web"},
                           "veth-a")
    b = world.put_endpoint("pod", "shop", "b", ("10.65.2.2", "fd65:2::2"), {"app": "batch"},
                           "veth-b")
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/24", "fd66:1::/64"),
                       {"kind": "saas"}, node=None)
    world.put_objects(POLICIES)
    node = Node(topology, world, ipv6=True)
    node.sync()

    def check() -> None:
        cases = [(s, d, p) for s in ("pod-a", "pod-b") for d in OUTSIDE_IPS6 for p in (80, 443)]
        keys = {"pod-a": a.key, "pod-b": b.key}
        with ThreadPoolExecutor(max_workers=12) as pool:
            got = list(pool.map(lambda c: topology.connect6(*c), cases))
        wrong = [(c, ok) for c, ok in zip(cases, got, strict=True)
                 if ok != world.expected(keys[c[0]], c[1], c[2])]
        assert not wrong, f"IPv6 connections that disagree with policy.verdict: {wrong}"

    check()
    assert topology.connect6("pod-a", "fd66:1::1", 443)
    assert not topology.connect6("pod-a", "fd66:2::1", 443)
    assert topology.connect("pod-a", "10.66.1.1", 443)  # IPv4 alongside
    sets = node.ipsets.list_sets()
    assert "fd66:1::/64" in sets[set_name(next(
        m.selector_uid for m in world.published.values()
        if m.endpoint_key == "globalnetworkset//saas"), "pc6")]

    # the set's IPv6 nets change: the inet6 set follows
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.1.0/24", "fd66:2::/64"),
                       {"kind": "saas"}, node=None)
    node.sync()
    assert topology.connect6("pod-a", "fd66:2::1", 443)
    assert not topology.connect6("pod-a", "fd66:1::1", 443)
    check()
    # the resync of the IPv6 plane repairs a rule deleted by hand
    topology.node.run("ip6tables", "-D", "pc-fwd", "1")
    assert topology.connect6("pod-a", "fd66::2", 80)
    assert sum(p.resync(s).repairs for s, p in node.planes) >= 1
    assert not topology.connect6("pod-a", "fd66::2", 80)
    assert sum(p.resync(s).repairs for s, p in node.planes) == 0  # kernel == ours, both families
    node.ipsets.close()
