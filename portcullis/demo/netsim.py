"""The simulated cluster's network: namespaces, veth pairs, TCP servers, real connections.

Everything lives in network namespaces this module creates (``pcd-<run>-…``); the host's
own interfaces, routes and firewall are never touched. `Network.close()` removes all of
it and is safe to call twice or after a partial build.

::

    pod netns 10.65.N.2 ──eth0═cali…── node netns ──eth0 10.0.0.11═eth0── outside netns
    (one per pod)          10.65.N.1    (forwarding; the       10.0.0.1, plus the servers'
                                         enforcer programs it) addresses (SaaS, database…)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from portcullis.demo import DemoError
from portcullis.demo.scenario import POD_CIDR, Cluster, Server

PREFIX = "pcd-"
#: How long a connection attempt waits: a dropped SYN looks like a timeout.
CONNECT_TIMEOUT = 0.5


def missing_requirements() -> list[str]:
    """Why the real dataplane cannot run here ([] when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root (network namespaces, veth pairs, ipsets and iptables need it)")
    for tool, package in (("ip", "iproute2"), ("ipset", "ipset"),
                          ("iptables-restore", "iptables")):
        if shutil.which(tool) is None:
            problems.append(f"the `{tool}` command (Debian package {package})")
    if not problems:
        try:
            subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"a working `ip netns` (it failed: {exc})")
    return problems


def leftover_namespaces(prefix: str = PREFIX) -> list[str]:
    """Named network namespaces with the demo's prefix (there should be none after a run)."""
    try:
        names = os.listdir("/var/run/netns")
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise DemoError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _sysctl(netns: str, setting: str) -> None:
    proc = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", setting],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise DemoError(f"sysctl {setting} in {netns} failed: {proc.stderr.strip()}")


def _serve(sock: socket.socket, stop: threading.Event) -> None:
    """Accept and close: a connection that opens is all the demo asks of a server."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (TimeoutError, OSError):
            continue
        with contextlib.suppress(OSError):
            conn.close()


def dns_query(ident: int, name: str) -> bytes:
    """A DNS query for ``name``'s A record (RD set), as a stub resolver sends it."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 1, 1)


def dns_answer(query: bytes, zone: dict[str, str], ttl: int = 300) -> bytes | None:
    """The answer to a query for a name in ``zone`` (name -> IPv4), NXDOMAIN for others;
    None for what is no query."""
    if len(query) < 17 or query[2] & 0x80:
        return None
    pos, labels = 12, []
    while pos < len(query) and query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode("ascii", "replace").lower())
        pos += 1 + query[pos]
    question = query[12 : pos + 5]
    address = zone.get(".".join(labels))
    head = struct.pack("!HHHHHH", struct.unpack_from("!H", query)[0],
                       0x8180 if address else 0x8183, 1, 1 if address else 0, 0, 0)
    if address is None:
        return head + question
    record = struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + socket.inet_aton(address)
    return head + question + record


def _serve_dns(sock: socket.socket, zone: dict[str, str], stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            query, peer = sock.recvfrom(512)
        except (TimeoutError, OSError):
            continue
        answer = dns_answer(query, zone)
        if answer is not None:
            with contextlib.suppress(OSError):
                sock.sendto(answer, peer)


@dataclass
class Network:
    """The namespaces of one demo run, by role: "node", "outside" and each pod's key."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: dict[str, str] = field(default_factory=dict)
    servers: list[socket.socket] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    dns_ip: str | None = None  # where pods look names up (the kube-dns pod)

    def name(self, role: str) -> str:
        slug = role.replace("pod/", "").replace("/", "-")
        return f"{PREFIX}{self.run_id}-{slug}"[:60]

    def _create(self, role: str) -> str:
        from enforcers import netns as netns_mod

        name = self.name(role)
        self.namespaces[role] = name  # recorded first: close() removes even a half-made one
        try:
            netns_mod.create(name)
        except netns_mod.NetnsError as exc:
            raise DemoError(str(exc)) from None
        return name

    def build(
        self,
        cluster: Cluster,
        uplink: str,
        node_ip: str,
        interface_of: Callable[[str], str],
    ) -> None:
        """Create the node, outside and pod namespaces, wire them, and start the servers.

        `uplink`/`node_ip` are the host endpoint's interface and address (from the
        examples); `interface_of(pod_key)` is the host-side veth name the watcher reports.
        """
        node = self._create("node")
        outside = self._create("outside")
        gateway = str(_gateway(node_ip))
        _ip("-n", node, "link", "add", uplink, "type", "veth", "peer", "name", "eth0",
            "netns", outside)
        _ip("-n", node, "addr", "add", f"{node_ip}/24", "dev", uplink)
        _ip("-n", node, "link", "set", uplink, "up")
        _ip("-n", outside, "addr", "add", f"{gateway}/24", "dev", "eth0")
        _ip("-n", outside, "link", "set", "eth0", "up")
        for server in cluster.outside_servers:
            with contextlib.suppress(DemoError):  # the same address twice is fine
                _ip("-n", outside, "addr", "add", f"{server.ip}/32", "dev", "lo")
        _ip("-n", outside, "route", "add", POD_CIDR, "via", node_ip)
        _ip("-n", node, "route", "add", "default", "via", gateway)
        _sysctl(node, "net.ipv4.ip_forward=1")
        for pod in cluster.pods:
            ns = self._create(pod.key)
            veth = interface_of(pod.key)
            _ip("-n", node, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("-n", node, "addr", "add", f"{pod.gateway}/24", "dev", veth)
            _ip("-n", node, "link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", pod.gateway)
        for server in cluster.servers:
            self._listen(self.namespaces[server.pod or "outside"], server)
        self._serve_names(cluster)

    def _serve_names(self, cluster: Cluster) -> None:
        """kube-dns answers on UDP too: the servers reached by name resolve to their IPs."""
        from enforcers import netns as netns_mod

        dns = next((s for s in cluster.servers if s.port == 53 and s.pod), None)
        zone = {s.domain: s.ip for s in cluster.servers if s.domain}
        if dns is None or dns.pod is None or not zone:
            return
        sock = netns_mod.open_socket(self.namespaces[dns.pod], socket.AF_INET, socket.SOCK_DGRAM)
        self.servers.append(sock)
        sock.bind((dns.ip, 53))
        self.dns_ip = dns.ip
        threading.Thread(target=_serve_dns, args=(sock, zone, self.stop), daemon=True,
                         name="kube-dns-udp").start()

    def resolve(self, role: str, name: str, timeout: float = 1.0) -> str | None:
        """Look `name` up from the namespace of `role` (None: no answer, or NXDOMAIN)."""
        from enforcers import netns as netns_mod

        if self.dns_ip is None:
            return None
        sock = netns_mod.open_socket(self.namespaces[role], socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        ident = secrets.randbelow(65536)
        try:
            sock.sendto(dns_query(ident, name), (self.dns_ip, 53))
            while True:
                answer = sock.recv(512)
                if struct.unpack_from("!H", answer)[0] == ident:
                    break
        except OSError:
            return None
        finally:
            sock.close()
        if struct.unpack_from("!H", answer, 6)[0] < 1 or len(answer) < 4:
            return None
        return socket.inet_ntoa(answer[-4:])

    def _listen(self, netns: str, server: Server) -> None:
        from enforcers import netns as netns_mod

        sock = netns_mod.open_socket(netns, socket.AF_INET, socket.SOCK_STREAM)
        self.servers.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((server.ip, server.port))
        except OSError as exc:
            raise DemoError(f"server {server.display} cannot listen: {exc}") from None
        sock.listen(128)
        threading.Thread(target=_serve, args=(sock, self.stop), daemon=True,
                         name=f"server-{server.name}-{server.port}").start()

    def connect(self, role: str, server: Server, timeout: float = CONNECT_TIMEOUT) -> bool:
        """One real TCP connection from the namespace of `role`; True when it opened."""
        from enforcers import netns as netns_mod

        address = server.ip
        if server.domain:  # by name: look it up first, then connect at once
            found = self.resolve(role, server.domain)
            if found is None:
                return False
            address = found
        sock = netns_mod.open_socket(self.namespaces[role], socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, server.port))
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def connect_all(self, attempts: Iterable[tuple[str, Server]]) -> list[bool]:
        """Many connections at once (a dropped SYN costs a whole timeout)."""
        attempts = list(attempts)
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(attempts)))) as pool:
            return list(pool.map(lambda a: self.connect(*a), attempts))

    def wait_for(self, role: str, server: Server, want: bool, timeout: float,
                 probe: float = 0.05) -> float | None:
        """Probe until a connection's outcome is `want`; the time it took, None on timeout."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.connect(role, server, timeout=probe) == want:
                return time.monotonic() - began
            if want is False:
                time.sleep(probe)
        return None

    def _in_node(self, *cmd: str) -> str:
        proc = subprocess.run(["ip", "netns", "exec", self.namespaces["node"], *cmd],
                              capture_output=True, text=True, timeout=30)
        return proc.stdout

    def dataplane_summary(self) -> str:
        """What the enforcer programmed in the node namespace, read back from the kernel."""
        rules = [line for line in self._in_node("iptables-save", "-t", "filter").splitlines()
                 if line.startswith("-A pc-")]
        sets: dict[str, str] = {}
        current = ""
        for line in self._in_node("ipset", "list", "-t").splitlines():
            if line.startswith("Name: "):
                current = line[6:].strip()
            elif line.startswith("Number of entries: ") and current:
                sets[current] = line.split(":", 1)[1].strip()
        listing = ", ".join(f"{name} ({n} members)" for name, n in sorted(sets.items()))
        return (f"in {self.namespaces['node']}: {len(rules)} iptables rules in pc- chains; "
                f"ipsets: {listing or 'none'}")

    def close(self) -> list[str]:
        """Stop the servers and remove every namespace made; returns what could not be removed."""
        from enforcers import netns as netns_mod

        self.stop.set()
        for sock in self.servers:
            with contextlib.suppress(OSError):
                sock.close()
        self.servers.clear()
        failed = []
        for role in list(self.namespaces)[::-1]:
            name = self.namespaces.pop(role)
            try:
                netns_mod.remove(name)
            except Exception as exc:  # keep removing the others
                failed.append(f"{name}: {exc}")
        return failed


def _gateway(node_ip: str) -> object:
    """The outside end of the node's uplink: .1 of the node's /24 (or .2 if that is the node)."""
    import ipaddress

    net = ipaddress.ip_network(f"{node_ip}/24", strict=False)
    first = net.network_address + 1
    return first if str(first) != node_ip else first + 1
