"""What the dataplane does not enforce as written is said per object, exactly once."""

from __future__ import annotations

from policy import load
from policy.enforcement import notes

DOCS = """
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: both}
spec:
  selector: all()
  types: [Ingress, Egress]
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [22]}}]
  egress:
  - {action: Allow, protocol: TCP, destination: {ports: [443]}}
  - {action: Allow, protocol: TCP, destination: {domains: [api.example.com], ports: [443]}}
  - {action: Deny, protocol: TCP, destination: {ports: [http]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-ingress}
spec: {selector: all(), types: [Ingress]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: egress-only}
spec:
  selector: all()
  types: [Egress]
  egress: [{action: Allow, destination: {nets: [10.0.0.0/8], notNets: [10.1.0.0/16]}}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: saas}
spec: {nets: [192.0.2.0/24], allowedEgressDomains: ["*.slack.com"]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: corp}
spec: {nets: [10.0.0.0/8]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: by-ip}
spec: {node: n1, expectedIPs: [10.0.0.11]}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: eth0}
spec: {node: n1, interfaceName: eth0}
"""


def test_each_object_says_what_is_not_enforced_as_written() -> None:
    said = {obj.key: notes(obj) for obj in load(DOCS)}
    assert said["GlobalNetworkPolicy//both"] == [
        "ingress is not enforced (Portcullis enforces egress only): its 1 ingress rule(s) "
        "have no effect",
        # domain names are enforced (from DNS answers): rule 1 needs no note
        "egress rule 2: named ports not enforced yet: this Deny rule denies at least what it "
        "says (fail closed)",
    ]
    assert said["GlobalNetworkPolicy//deny-ingress"] == [
        "ingress is not enforced (Portcullis enforces egress only): its default deny of "
        "ingress has no effect"]
    assert said["GlobalNetworkSet//saas"] == []  # its domains are enforced (DNS learning)
    assert "expectedIPs" in said["HostEndpoint//by-ip"][0]
    for quiet in ("GlobalNetworkPolicy//egress-only", "GlobalNetworkSet//corp",
                  "HostEndpoint//eth0"):
        assert said[quiet] == []
