"""Host inventory files: parsing with located errors, last-valid-state, renames, removals."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from watchers.inventory import Inventory, InventoryError, parse_host
from watchers.mirror import Mirror

VM = """
name: billing-vm-1
node: hypervisor-3
interfaces:
  - name: eth0
    ips: [10.20.0.5, "fd00::5"]
labels:
  app: billing
  tier: 2
"""


def test_a_vm_file_is_one_endpoint_with_all_its_ips() -> None:
    rec = parse_host(VM, "hosts/vm.yaml", 5.0)
    assert rec.key == "vm//billing-vm-1"
    assert (rec.kind, rec.node, rec.interface) == ("vm", "hypervisor-3", "eth0")
    assert rec.ips == ("10.20.0.5", "fd00::5")
    assert rec.labels == {"app": "billing", "tier": "2"}
    assert (rec.source, rec.observed_at, rec.namespace) == ("inventory", 5.0, None)


def test_a_host_with_several_interfaces_is_a_host_endpoint_on_each_of_them() -> None:
    text = ("name: db1\nkind: host\ninterfaces:\n  - {name: eth0, ips: [10.0.0.1]}\n"
            "  - {name: eth1, ips: [192.168.1.1]}\nprofiles: [projectcalico-default-allow]\n")
    rec = parse_host(text, "h.yaml", 1.0)
    assert (rec.key, rec.node, rec.interface) == ("hostendpoint//db1", "db1", "eth0,eth1")
    assert rec.ips == ("10.0.0.1", "192.168.1.1")
    assert rec.profiles == ("projectcalico-default-allow",)


def test_a_vm_with_several_interfaces_names_each_of_them() -> None:
    """Not '*': iptables reads ``-i *`` as an interface named '*', which matches nothing."""
    text = ("name: vm2\ninterfaces:\n  - {name: eth0, ips: [10.0.0.1]}\n"
            "  - {name: eth1, ips: [192.168.1.1]}\n")
    rec = parse_host(text, "v.yaml", 1.0)
    assert (rec.kind, rec.node, rec.interface) == ("vm", "vm2", "eth0,eth1")


@pytest.mark.parametrize(("text", "expected"), [
    ("name: Bad_Name\ninterfaces: [{name: eth0, ips: [10.0.0.1]}]", "x.yaml: name: invalid"),
    ("name: a\ninterfaces: []", "x.yaml: interfaces: required"),
    ("name: a\ninterfaces: [{name: eth0, ips: [10.0.0.300]}]", "x.yaml: interfaces[0].ips[0]:"),
    ("name: a\ninterfaces: [{name: eth0}]", "x.yaml: interfaces[0].ips: required"),
    ("name: a\nkind: pod\ninterfaces: [{name: e, ips: [1.1.1.1]}]", "x.yaml: kind: expected"),
    ("name: a\ninterfaces: [{name: e, ips: [1.1.1.1]}]\nlabels: {'a b': c}", "labels.a b"),
    ("name: a\ninterface: []", "x.yaml: interface: unknown field"),
    ("name: a\ninterfaces: [{name: 'cali+', ips: [1.1.1.1]}]", "interfaces[0].name: expected"),
    ("name: a\nkind: host\ninterfaces: [{name: e, ips: [1.1.1.1]}]\nprofiles: [kns.x]",
     "x.yaml: profiles[0]: unknown profile 'kns.x'"),
    ("name: a\ninterfaces: [{name: e, ips: [1.1.1.1]}]\nprofiles: [projectcalico-default-allow]",
     "x.yaml: profiles[0]: only a host has profiles"),
    ("name: [a\n", "x.yaml: line 2, column 1: not valid YAML"),
    ("- just\n- a list\n", "x.yaml: expected a mapping"),
])
def test_errors_name_the_file_and_the_field(text: str, expected: str) -> None:
    with pytest.raises(InventoryError) as exc:
        parse_host(text, "x.yaml", 0.0)
    assert expected in str(exc.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InventoryError) as exc:
        parse_host("name: A\ninterfaces: [{name: eth0, ips: [nope]}]\nlabels: 3", "x.yaml", 0)
    lines = str(exc.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["name", "interfaces[0].ips[0]", "labels"]


def test_a_broken_edit_keeps_the_last_valid_state_and_a_fix_publishes() -> None:
    inv = Inventory()
    assert [p.key for p in inv.update("a.yaml", VM, 1.0)] == ["vm//billing-vm-1"]
    assert inv.update("a.yaml", VM.replace("10.20.0.5", "10.20.0.999"), 2.0) == []
    assert "a.yaml: interfaces[0].ips[0]" in inv.errors["a.yaml"]
    assert inv.hosts["a.yaml"].ips == ("10.20.0.5", "fd00::5")
    pubs = inv.update("a.yaml", VM.replace("10.20.0.5", "10.20.0.6"), 3.0)
    assert pubs[0].value is not None and pubs[0].value.ips[0] == "10.20.0.6"
    assert inv.errors == {}


def test_renaming_the_host_in_its_file_tombstones_the_old_name() -> None:
    inv = Inventory()
    inv.update("a.yaml", VM, 1.0)
    pubs = inv.update("a.yaml", VM.replace("billing-vm-1", "billing-vm-2"), 2.0)
    assert [(p.key, p.value is None) for p in pubs] == [
        ("vm//billing-vm-1", True), ("vm//billing-vm-2", False)]


def test_two_files_cannot_claim_the_same_host() -> None:
    inv = Inventory()
    inv.update("a.yaml", VM, 1.0)
    assert inv.update("b.yaml", VM, 1.0) == []
    assert "already defined in a.yaml" in inv.errors["b.yaml"]
    assert [p.key for p in inv.remove("a.yaml")] == ["vm//billing-vm-1"]
    assert inv.remove("a.yaml") == []


def _doc(path: str, variant: int, ip: int, valid: bool) -> str:
    doc = {"name": f"{path}-{variant}", "interfaces": [
        {"name": "eth0", "ips": [f"10.0.0.{ip if valid else 300}"]}], "labels": {"v": str(ip)}}
    return yaml.safe_dump(doc)


ops = st.lists(st.tuples(
    st.sampled_from(["h0", "h1", "h2"]), st.booleans(), st.integers(0, 1), st.integers(1, 3),
    st.booleans()), max_size=25)


@given(ops)
@settings(max_examples=150, deadline=None)
def test_topic_equals_the_last_valid_state_of_the_files_that_exist(
    operations: list[tuple[str, bool, int, int, bool]],
) -> None:
    inv, mirror, topic = Inventory(), Mirror(), {}
    oracle: dict[str, tuple[str, int]] = {}  # path -> (name, ip) of the last valid content
    for path, remove, variant, ip, valid in operations:
        if remove:
            pubs = inv.remove(path)
            oracle.pop(path, None)
        else:
            pubs = inv.update(path, _doc(path, variant, ip, valid), 0.0)
            if valid:
                oracle[path] = (f"{path}-{variant}", ip)
        changes = mirror.changes(pubs)
        mirror.commit("inventory", changes)
        for pub in changes:
            if pub.value is None:
                topic.pop(pub.key, None)
            else:
                topic[pub.key] = pub.value
    assert {k: (r.name, int(r.ips[0].split(".")[-1])) for k, r in topic.items()} == {
        f"vm//{name}": (name, ip) for name, ip in oracle.values()}
