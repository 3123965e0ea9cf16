"""Domain rules with real DNS: a dnspython server outside, real lookups and TCP from pods.

The topology is ``test_traffic``'s (pods A and B behind a forwarding node, servers outside).
A DNS server on 10.66.0.53 (UDP and TCP, answers built by dnspython, an independent
implementation of the wire format) serves names for addresses in the outside namespace.
The enforcer core is fed as in ``test_traffic``; its DNS learner reads the real NFQUEUE
queue of the node's namespace on a thread, holding each answer until its IPs are
programmed, as ``portcullis enforce`` does in its event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from enforcers import netns as netns_mod
from enforcers.dns import DnsSettings, DnsSnooper
from tests.dataplane.conftest import Netns
from tests.dataplane.test_traffic import Node, Topology, World, build_topology, ip

NETNS_PREFIX = "pc-dn-"
DNS_IP = "10.66.0.53"
ROGUE_DNS_IP = "10.66.0.54"  # answers like the real one, but is not trusted
QUEUE = 77
POD_A = "10.65.1.2"

POLICY = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: web-egress}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination: {nets: [10.66.0.53/32, 10.66.0.54/32], ports: [53]}
  - {action: Allow, protocol: TCP, destination: {nets: [10.66.0.53/32], ports: [53]}}
  - action: Allow
    protocol: TCP
    destination:
      domains: [api.example.test, "*.fleet.example.test", www.example.test,
                moving.example.test, short.example.test, tcp.example.test]
      ports: [80]
"""

Zone = dict[str, list[tuple[str, int, str]]]  # name -> (type, ttl, value)


@dataclass
class DnsServer:
    """Authoritative answers for ``zone`` on UDP and TCP port 53 of one address."""

    ns: Netns
    address: str
    zone: Zone = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    sockets: list[socket.socket] = field(default_factory=list)

    def start(self) -> None:
        udp = netns_mod.open_socket(self.ns.name, socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((self.address, 53))
        tcp = netns_mod.open_socket(self.ns.name, socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((self.address, 53))
        tcp.listen(16)
        self.sockets = [udp, tcp]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        for sock in self.sockets:
            sock.close()

    def answer(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        name = str(query.question[0].name).rstrip(".").lower()
        asked = dns.rdatatype.to_text(query.question[0].rdtype)
        seen: set[str] = set()
        while name in self.zone and name not in seen:
            seen.add(name)
            follow = None
            for rtype, ttl, value in self.zone[name]:
                if rtype not in (asked, "CNAME"):
                    continue
                rrset = response.find_rrset(response.answer, dns.name.from_text(name),
                                            dns.rdataclass.IN, dns.rdatatype.from_text(rtype),
                                            create=True)
                rrset.update_ttl(ttl)
                rrset.add(dns.rdata.from_text(dns.rdataclass.IN,
                                              dns.rdatatype.from_text(rtype), value))
                if rtype == "CNAME":
                    follow = value.rstrip(".")
            if follow is None:
                break
            name = follow
        if not response.answer:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    def _serve(self) -> None:
        udp, tcp = self.sockets
        while not self.stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                ready, _, _ = select.select([udp, tcp], [], [], 0.1)
                if udp in ready:
                    wire, peer = udp.recvfrom(4096)
                    udp.sendto(self.answer(wire), peer)
                if tcp in ready:
                    conn, _ = tcp.accept()
                    with conn:
                        conn.settimeout(2)
                        (length,) = struct.unpack("!H", conn.recv(2))
                        reply = self.answer(conn.recv(length))
                        # two segments: the learner must put the message back together
                        frame = struct.pack("!H", len(reply)) + reply
                        conn.sendall(frame[:7])
                        time.sleep(0.01)
                        conn.sendall(frame[7:])


class Learning:
    """The node's DNS learner on a thread: queue readable -> learn, program, release."""

    def __init__(self, node: Node, topo: Topology, grace: float = 2.0) -> None:
        self.node = node
        self.lock = threading.Lock()
        settings = DnsSettings(servers=(DNS_IP,), queue=QUEUE, namespace=topo.node.name,
                               grace=grace)
        node.state.dns = settings.capture()
        self.snooper = DnsSnooper(settings, node.sink.domains, self._apply, node.metrics)
        self.queue = self.snooper.open()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _apply(self, changes: list, _at: float) -> None:  # type: ignore[type-arg]
        self.node.sink.apply_domain_changes(changes)
        self.node.sync()

    def _run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.queue], [], [], 0.05)
            with self.lock:
                if ready:
                    self.snooper.readable()
                expired = self.snooper.expire(time.time())
                if expired:
                    self.node.sink.apply_domain_changes(expired)
                    self.node.sync()

    def sync(self) -> None:
        with self.lock:
            self.node.sync()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.snooper.stop()


@pytest.fixture
def world_and_dns(make_netns: Callable[[], Netns]) -> Iterator[tuple[Topology, DnsServer,
                                                                     DnsServer]]:
    topo = build_topology(make_netns)
    for address in (DNS_IP, ROGUE_DNS_IP):
        ip("-n", topo.outside.name, "addr", "add", f"{address}/32", "dev", "eth0")
    for i in range(1, 101):
        ip("-n", topo.outside.name, "addr", "add", f"10.66.4.{i}/32", "dev", "eth0")
    ip("-n", topo.outside.name, "addr", "add", "10.66.5.1/32", "dev", "eth0")
    ip("-n", topo.outside.name, "addr", "add", "10.66.5.2/32", "dev", "eth0")
    server = DnsServer(topo.outside, DNS_IP)
    rogue = DnsServer(topo.outside, ROGUE_DNS_IP)
    server.start()
    rogue.start()
    try:
        yield topo, server, rogue
    finally:
        server.close()
        rogue.close()
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def resolve(topo: Topology, pod: str, name: str, server: str = DNS_IP,
            tcp: bool = False) -> list[str]:
    """A lookup from inside a pod, as its resolver would make it."""
    query = dns.message.make_query(name, "A")
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    sock = netns_mod.open_socket(topo.pods[pod].name, socket.AF_INET, kind)
    sock.settimeout(3)
    try:
        if tcp:
            sock.connect((server, 53))
            response = dns.query.tcp(query, server, timeout=3, sock=sock)
        else:
            response = dns.query.udp(query, server, timeout=3, sock=sock)
    finally:
        sock.close()
    return [r.address for rrset in response.answer for r in rrset
            if rrset.rdtype == dns.rdatatype.A]


def _setup(topo: Topology, grace: float = 2.0) -> tuple[World, Node, Learning]:
    world = World()
    world.put_endpoint("pod", "shop", "a", (POD_A,), {"app": "web"}, "veth-a")
    world.put_objects(POLICY)
    node = Node(topo, world, prefixes=("veth",))
    learning = Learning(node, topo, grace)
    learning.sync()
    return world, node, learning


def test_first_connection_after_a_lookup_succeeds_a_hundred_times(
    world_and_dns: tuple[Topology, DnsServer, DnsServer],
) -> None:
    """Each of 100 names resolves to an address never seen before; the pod connects right
    after the answer arrives, once, and it must open: the answer was held until its IP was
    in the domain set. Before the lookup, the same address is denied."""
    topo, server, _ = world_and_dns
    for i in range(1, 101):
        server.zone[f"n{i}.fleet.example.test"] = [("A", 60, f"10.66.4.{i}")]
    _world, node, learning = _setup(topo)
    try:
        for i in (1, 50, 100):  # not yet resolved: denied (each denial costs a timeout)
            assert not topo.connect("pod-a", f"10.66.4.{i}", 80)
        failures = []
        for i in range(1, 101):
            (address,) = resolve(topo, "pod-a", f"n{i}.fleet.example.test")
            if not topo.connect("pod-a", address, 80):
                failures.append(address)
        assert failures == []
        assert node.metrics.dns_answers.value >= 100
        assert node.metrics.dns_hold.n >= 100
        # the apex is not covered by "*.fleet.example.test"
        server.zone["fleet.example.test"] = [("A", 60, "10.66.5.2")]
        assert resolve(topo, "pod-a", "fleet.example.test") == ["10.66.5.2"]
        assert not topo.connect("pod-a", "10.66.5.2", 80)
    finally:
        learning.close()
        node.ipsets.close()


def test_cname_chain_tcp_ip_change_and_ttl_expiry(
    world_and_dns: tuple[Topology, DnsServer, DnsServer],
) -> None:
    topo, server, _ = world_and_dns
    server.zone["www.example.test"] = [("CNAME", 300, "edge.cdn.test.")]
    server.zone["edge.cdn.test"] = [("CNAME", 300, "pop7.cdn.test.")]
    server.zone["pop7.cdn.test"] = [("A", 300, "10.66.5.1")]
    server.zone["moving.example.test"] = [("A", 60, "10.66.4.1")]
    server.zone["short.example.test"] = [("A", 1, "10.66.4.2")]
    server.zone["tcp.example.test"] = [("A", 60, "10.66.4.3")]
    _world, node, learning = _setup(topo, grace=0.0)
    try:
        # A CNAME chain: the allowed name's IPs are those at the end of its chain.
        assert resolve(topo, "pod-a", "www.example.test") == ["10.66.5.1"]
        assert topo.connect("pod-a", "10.66.5.1", 80)
        assert not topo.connect("pod-a", "10.66.5.1", 443)  # the rule's port only
        # DNS over TCP, the answer split over two segments.
        assert not topo.connect("pod-a", "10.66.4.3", 80)
        assert resolve(topo, "pod-a", "tcp.example.test", tcp=True) == ["10.66.4.3"]
        assert topo.connect("pod-a", "10.66.4.3", 80)
        # The name moves: the new address is followed (the old one stays for its TTL).
        assert resolve(topo, "pod-a", "moving.example.test") == ["10.66.4.1"]
        assert topo.connect("pod-a", "10.66.4.1", 80)
        server.zone["moving.example.test"] = [("A", 60, "10.66.4.4")]
        assert resolve(topo, "pod-a", "moving.example.test") == ["10.66.4.4"]
        assert topo.connect("pod-a", "10.66.4.4", 80)
        # TTL 1 s, no grace: once expired, new connections are denied...
        sock = netns_mod.open_socket(topo.pods["pod-a"].name, socket.AF_INET,
                                     socket.SOCK_STREAM)
        assert resolve(topo, "pod-a", "short.example.test") == ["10.66.4.2"]
        sock.settimeout(1)
        sock.connect(("10.66.4.2", 80))
        deadline = time.monotonic() + 5
        while topo.connect("pod-a", "10.66.4.2", 80):
            assert time.monotonic() < deadline, "the expired IP was never removed"
            time.sleep(0.2)
        # ...and the connection opened before expiry still works (conntrack).
        sock.sendall(b"x")
        sock.close()
        assert node.metrics.dns_answers.value >= 5
    finally:
        learning.close()
        node.ipsets.close()


def _spoofed_answer(name: str, address: str, source: str, destination: str,
                    dport: int) -> bytes:
    """A raw IPv4/UDP packet carrying an answer 'name -> address' from source:53."""
    response = dns.message.make_response(dns.message.make_query(name, "A"))
    response.answer.append(dns.rrset.from_text(name + ".", 300, "IN", "A", address))
    payload = response.to_wire()
    udp = struct.pack("!HHHH", 53, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    return header + udp


def test_answers_from_untrusted_sources_teach_nothing(
    world_and_dns: tuple[Topology, DnsServer, DnsServer],
) -> None:
    """A rogue server outside, and a pod forging the trusted server's address, both answer
    with a name the policy allows: neither makes its address reachable."""
    topo, server, rogue = world_and_dns
    rogue.zone["api.example.test"] = [("A", 300, "10.66.4.9")]
    server.zone["api.example.test"] = [("A", 300, "10.66.4.10")]
    _world, node, learning = _setup(topo)
    try:
        assert resolve(topo, "pod-a", "api.example.test", server=ROGUE_DNS_IP) == ["10.66.4.9"]
        # pod B forges "api.example.test -> 10.66.4.11" from the trusted server to pod A
        raw = netns_mod.open_socket(topo.pods["pod-b"].name, socket.AF_INET, socket.SOCK_RAW,
                                    socket.IPPROTO_RAW)
        try:
            for _ in range(3):
                raw.sendto(_spoofed_answer("api.example.test", "10.66.4.11", DNS_IP, POD_A,
                                           40000), (POD_A, 0))
        finally:
            raw.close()
        time.sleep(0.3)
        assert not topo.connect("pod-a", "10.66.4.9", 80)
        assert not topo.connect("pod-a", "10.66.4.11", 80)
        # the trusted server's own answer still works
        assert resolve(topo, "pod-a", "api.example.test") == ["10.66.4.10"]
        assert topo.connect("pod-a", "10.66.4.10", 80)
    finally:
        learning.close()
        node.ipsets.close()


NETWORK_SET_POLICY = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: saas, labels: {kind: saas}}
spec: {nets: [10.66.5.1/32], allowedEgressDomains: ["*.saas.test"]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: to-saas}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {nets: [10.66.0.53/32], ports: [53]}}
  - {action: Deny, protocol: TCP, destination: {selector: kind == 'saas', ports: [443]}}
  - {action: Allow, protocol: TCP, destination: {selector: kind == 'saas'}}
  - {action: Allow, protocol: TCP, destination: {nets: [10.66.4.0/24], ports: [443]}}
"""


def test_network_sets_allowed_egress_domains_count_for_egress_allow_rules_only(
    world_and_dns: tuple[Topology, DnsServer, DnsServer],
) -> None:
    """An Allow to a selector matches the network sets' nets and the IPs of their
    allowedEgressDomains; a Deny to the same selector matches the nets only (Calico)."""
    topo, server, _ = world_and_dns
    server.zone["eu.saas.test"] = [("A", 60, "10.66.4.20")]
    server.zone["other.test"] = [("A", 60, "10.66.4.21")]
    world = World()
    world.put_endpoint("pod", "shop", "a", (POD_A,), {"app": "web"}, "veth-a")
    world.put_objects(NETWORK_SET_POLICY)
    # as `apply` publishes a network set: the document, and its nets as an endpoint record
    world.put_endpoint("globalnetworkset", None, "saas", ("10.66.5.1/32",), {"kind": "saas"},
                       node=None)
    node = Node(topo, world, prefixes=("veth",))
    learning = Learning(node, topo)
    learning.sync()
    try:
        assert topo.connect("pod-a", "10.66.5.1", 80)  # the set's net
        assert not topo.connect("pod-a", "10.66.5.1", 443)  # ... denied on 443
        assert not topo.connect("pod-a", "10.66.4.20", 80)  # not resolved yet
        assert resolve(topo, "pod-a", "eu.saas.test") == ["10.66.4.20"]
        assert topo.connect("pod-a", "10.66.4.20", 80)  # by the set's domains
        assert topo.connect("pod-a", "10.66.4.20", 443)  # the Deny does not count domains
        assert resolve(topo, "pod-a", "other.test") == ["10.66.4.21"]
        assert not topo.connect("pod-a", "10.66.4.21", 80)  # a name no set allows
        # the set loses its domains: the learned IP no longer counts
        world.put_objects(NETWORK_SET_POLICY.replace(', allowedEgressDomains: ["*.saas.test"]',
                                                     ""))
        learning.sync()
        assert not topo.connect("pod-a", "10.66.4.20", 80)
        assert topo.connect("pod-a", "10.66.5.1", 80)
    finally:
        learning.close()
        node.ipsets.close()


IN_CLUSTER_DNS_POLICY = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: web-egress}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {nets: [10.65.2.2/32], ports: [53]}}
  - {action: Allow, protocol: TCP, destination: {domains: [api.example.test], ports: [80]}}
"""


@pytest.mark.parametrize("labelled", [True, False])
def test_a_dns_server_pod_on_the_same_node_is_trusted_only_when_selected(
    make_netns: Callable[[], Netns], labelled: bool,
) -> None:
    """CoreDNS often runs on the client's node: its answers come from a workload interface.
    They are learned when its pod matches the DNS-server-pod selector, never otherwise."""
    from policy.selectors import parse

    topo = build_topology(make_netns)
    ip("-n", topo.outside.name, "addr", "add", "10.66.4.30/32", "dev", "eth0")
    server = DnsServer(topo.pods["pod-b"], "10.65.2.2")
    server.zone["api.example.test"] = [("A", 60, "10.66.4.30")]
    server.start()
    world = World()
    world.put_endpoint("pod", "shop", "a", (POD_A,), {"app": "web"}, "veth-a")
    dns_labels = {"k8s-app": "kube-dns"} if labelled else {"k8s-app": "other"}
    world.put_endpoint("pod", "kube-system", "coredns", ("10.65.2.2",), dns_labels, "veth-b")
    world.put_objects(IN_CLUSTER_DNS_POLICY)
    node = Node(topo, world, prefixes=("veth",))
    node.state.dns_server_pods = parse(
        "k8s-app == 'kube-dns' && projectcalico.org/namespace == 'kube-system'")
    learning = Learning(node, topo)
    learning.snooper.servers = frozenset({"10.65.2.2"})
    node.state.dns = dataclasses.replace(node.state.dns, servers=("10.65.2.2",))
    learning.sync()
    try:
        assert resolve(topo, "pod-a", "api.example.test", server="10.65.2.2") == ["10.66.4.30"]
        assert topo.connect("pod-a", "10.66.4.30", 80) == labelled
    finally:
        learning.close()
        node.ipsets.close()
        server.close()
        topo.stop.set()
        for sock in topo.servers:
            sock.close()


def test_aaaa_answers_open_ipv6_and_a_answers_ipv4(
    world_and_dns: tuple[Topology, DnsServer, DnsServer],
) -> None:
    """One name with A and AAAA records: each family's domain set gets its own addresses."""
    from tests.dataplane.test_traffic import add_ipv6

    topo, server, _ = world_and_dns
    add_ipv6(topo)
    server.zone["api.example.test"] = [("A", 60, "10.66.4.40"), ("AAAA", 60, "fd66:2::1")]
    world = World()
    world.put_endpoint("pod", "shop", "a", (POD_A, "fd65:1::2"), {"app": "web"}, "veth-a")
    world.put_objects(POLICY)
    node = Node(topo, world, ipv6=True, prefixes=("veth",))
    learning = Learning(node, topo)
    node.planes[1][0].dns = node.state.dns
    learning.sync()
    try:
        assert not topo.connect6("pod-a", "fd66:2::1", 80)
        query = dns.message.make_query("api.example.test", "AAAA")
        sock = netns_mod.open_socket(topo.pods["pod-a"].name, socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(3)
        try:
            answer = dns.query.udp(query, DNS_IP, timeout=3, sock=sock)
        finally:
            sock.close()
        assert [r.address for rrset in answer.answer for r in rrset] == ["fd66:2::1"]
        assert topo.connect6("pod-a", "fd66:2::1", 80)
        assert not topo.connect("pod-a", "10.66.4.40", 80)  # the A record: not asked yet
        assert resolve(topo, "pod-a", "api.example.test") == ["10.66.4.40"]
        assert topo.connect("pod-a", "10.66.4.40", 80)
    finally:
        learning.close()
        node.ipsets.close()
