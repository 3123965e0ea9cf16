"""deploy/: the Containerfile and the Kubernetes manifests, checked offline.

Schemas: every Kubernetes object against the OpenAPI schemas of Kubernetes 1.35 and 1.37
(kubernetes-validate, strict: unknown fields rejected), every Strimzi resource against
Strimzi 1.0's CRD schemas (node, .cache/strimzi-schemas from ./dev install). Consistency:
container args parse with the real `portcullis` parser, env with the real settings
loader, probes use the health port flag, the Strimzi topics and users are generated from
topics/specs.py and one access table that matches the code and deploy/acls.md.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from portcullis import settings as settings_mod
from portcullis.cli import build_parser
from topics.specs import SPECS, TopicSpec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
STRIMZI = KUBE / "strimzi"
K8S_VERSIONS = ("1.35.0", "1.37.0")
HEALTH_PORT = "9099"

_spec = importlib.util.spec_from_file_location("strimzi_generate", STRIMZI / "generate.py")
assert _spec and _spec.loader
gen = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gen
_spec.loader.exec_module(gen)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomize_files() -> list[Path]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [DEPLOY / r for r in kust["resources"]]


def strimzi_files() -> list[Path]:
    kust = yaml.safe_load((STRIMZI / "kustomization.yaml").read_text())
    return [STRIMZI / r for r in kust["resources"]]


ALL_DOCS = [(p, d) for p in kustomize_files() for d in _docs(p)]
STRIMZI_DOCS = [(p, d) for p in strimzi_files() for d in _docs(p)]


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _p, d in ALL_DOCS + STRIMZI_DOCS if d["kind"] == kind}


def workloads() -> list[dict[str, Any]]:
    return [d for _p, d in ALL_DOCS if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet",
                                                     "Job")]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


# --------------------------------------------------------------------------- files


def test_every_manifest_is_in_a_kustomization() -> None:
    listed = set(kustomize_files()) | set(strimzi_files())
    on_disk = ({DEPLOY / "rbac.yaml"} | set((DEPLOY / "crds").glob("*.yaml"))
               | set(KUBE.glob("*.yaml")) | set(STRIMZI.glob("*.yaml")))
    on_disk -= {STRIMZI / "kustomization.yaml"}
    assert on_disk == listed, f"not in a kustomization: {sorted(map(str, on_disk - listed))}"


def test_strimzi_topics_and_users_are_generated() -> None:
    for path, text in gen.files().items():
        assert path.read_text() == text, f"{path} is stale: run {STRIMZI / 'generate.py'}"


# --------------------------------------------------------------------------- schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_match_the_openapi_schemas_strictly(version: str) -> None:
    errors = []
    for path, doc in ALL_DOCS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)
    assert len(ALL_DOCS) >= 20


def test_strict_validation_rejects_what_the_api_server_would() -> None:
    dep = json.loads(json.dumps(objects("Deployment")["portcullis-watcher"]))
    dep["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagee"):
        kubernetes_validate.validate(dep, K8S_VERSIONS[-1], strict=True)


def _strimzi_errors(docs: list[dict[str, Any]]) -> list[list[str]]:
    node = shutil.which("node")
    modules = ROOT / ".cache" / "strimzi-schemas" / "node_modules"
    assert node, "node is needed for the Strimzi schemas (./dev install installs nodejs)"
    assert modules.is_dir(), f"{modules} missing: run ./dev install"
    proc = subprocess.run([node, str(STRIMZI / "schemas" / "validate.mjs"), str(modules)],
                          input=json.dumps(docs), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: list[list[str]] = json.loads(proc.stdout)
    return result


def test_strimzi_resources_match_the_strimzi_crd_schemas() -> None:
    docs = [d for _p, d in STRIMZI_DOCS]
    assert {d["kind"] for d in docs} == {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    errors = [f"{d['kind']}/{d['metadata']['name']}: {e}"
              for d, e in zip(docs, _strimzi_errors(docs), strict=True) if e]
    assert not errors, "\n".join(errors)


def test_strimzi_validation_rejects_bad_resources() -> None:
    user = json.loads(json.dumps(objects("KafkaUser")["portcullis-enforcer"]))
    user["spec"]["authorization"]["acls"][0]["operations"] = ["Wrtie"]
    topic = json.loads(json.dumps(objects("KafkaTopic")["portcullis.policies"]))
    topic["spec"]["partitions"] = "twelve"
    kafka = json.loads(json.dumps(objects("Kafka")["portcullis-kafka"]))
    kafka["apiVersion"] = "kafka.strimzi.io/v1beta9"
    errors = _strimzi_errors([user, topic, kafka])
    assert all(errors), errors
    assert "operations" in errors[0][0] and "partitions" in errors[1][0]


# --------------------------------------------------------------------------- args and env


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet makes it (fieldRefs and secrets: markers)."""
    configmaps = objects("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = f"<{var['valueFrom']['fieldRef']['fieldPath']}>"
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return env


def _args(container: dict[str, Any]) -> list[str]:
    env = _env(container)

    def expand(arg: str) -> str:
        def one(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"{container['name']}: $({m.group(1)}) is not in its env"
            return env[m.group(1)]
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)

    assert "command" not in container, "the image's ENTRYPOINT is portcullis"
    return [expand(a) for a in container["args"]]


def _parse(container: dict[str, Any]) -> Any:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return build_parser().parse_args(_args(container))
        except SystemExit:
            pytest.fail(f"container {container['name']}: `portcullis {' '.join(_args(container))}`"
                        f" does not parse: {err.getvalue().strip()} (--health-port and "
                        "--leader-elect* come from the health and leader-election branches)")


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


@pytest.mark.parametrize("name", ["portcullis-enforcer", "portcullis-processor",
                                  "portcullis-watcher", "portcullis-topics"])
def test_container_args_parse_with_the_real_parser_and_settings(name: str) -> None:
    [workload] = [w for w in workloads() if w["metadata"]["name"] == name]
    for container in containers(workload):
        args = _parse(container)
        env = _env(container)
        unknown = sorted(k for k in env if k.startswith(settings_mod.ENV_PREFIX)
                         and k[len(settings_mod.ENV_PREFIX):].lower() not in
                         {f for f in settings_mod._KAFKA_FIELDS | settings_mod._TOP_FIELDS}
                         and k != "PORTCULLIS_IPTABLES_BACKEND")
        assert not unknown, f"{name}: not settings: {unknown}"
        conf = settings_mod.load(args, environ=env)
        assert conf.topic_prefix == gen.PREFIX
        assert conf.partitions == gen.PARTITIONS and conf.replication_factor == gen.REPLICAS
        kafka = conf.kafka
        user = kafka.sasl_username
        assert user in objects("KafkaUser"), f"{name}: no KafkaUser {user}"
        assert kafka.sasl_password == f"<secret {user}/password>", "the user's own secret"
        assert (kafka.security_protocol, kafka.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        [listener] = objects("Kafka")[gen.CLUSTER]["spec"]["kafka"]["listeners"]
        assert listener["tls"] and listener["authentication"]["type"] == "scram-sha-512"
        assert kafka.bootstrap == f"{gen.CLUSTER}-kafka-bootstrap:{listener['port']}"
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        ca_dir, ca_file = os.path.split(kafka.ssl_cafile or "")
        secret = volumes[mounts[ca_dir]]["secret"]
        assert secret["secretName"] == f"{gen.CLUSTER}-cluster-ca-cert"
        assert {"key": "ca.crt", "path": ca_file} in secret["items"]


def _container(name: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    [workload] = [w for w in workloads() if w["metadata"]["name"] == name]
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return workload, container, _args(container)


@pytest.mark.parametrize("name", ["portcullis-enforcer", "portcullis-processor",
                                  "portcullis-watcher"])
def test_probes_use_the_health_port_flag(name: str) -> None:
    _w, container, args = _container(name)
    port = _flag(args, "--health-port")
    assert port == HEALTH_PORT
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": int(port)}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": int(port)}
    assert int(port) in {p["containerPort"] for p in container["ports"]}


def test_enforcer_daemonset_runs_on_every_node_in_the_host_network() -> None:
    workload, container, args = _container("portcullis-enforcer")
    pod = workload["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    caps = container["securityContext"]["capabilities"]
    assert caps == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["securityContext"]["runAsUser"] == 0
    node = next(e for e in container["env"] if e["name"] == "NODE_NAME")
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert _flag(container["args"], "--node") == "$(NODE_NAME)"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/run/xtables.lock"]]["hostPath"] == {
        "path": "/run/xtables.lock", "type": "FileOrCreate"}
    state = os.path.dirname(_flag(args, "--dns-state-file") or "")
    assert "hostPath" in volumes[mounts[state]], "the DNS state file must outlive the pod"
    metrics = int(_flag(args, "--metrics-port") or 0)
    assert metrics in {p["containerPort"] for p in container["ports"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts, "the iptables wrapper caches its backend choice in /tmp"


def test_processor_keeps_rocksdb_on_a_volume_claim() -> None:
    workload, container, _ = _container("portcullis-processor")
    parsed = _parse(container)
    assert parsed.store == "rocksdb"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in workload["spec"]["volumeClaimTemplates"]}
    assert mounts[parsed.data_dir] in claims
    assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_watcher_elects_a_leader_with_a_lease_it_may_write() -> None:
    workload, _c, args = _container("portcullis-watcher")
    assert workload["spec"]["replicas"] == 2 and "--leader-elect" in args
    namespace = _flag(args, "--leader-elect-namespace")
    assert namespace == "<metadata.namespace>"
    assert _flag(args, "--leader-elect-lease-name")
    sa = workload["spec"]["template"]["spec"]["serviceAccountName"]
    ns = workload["metadata"]["namespace"]
    [binding] = [b for b in objects("RoleBinding").values()
                 if {"kind": "ServiceAccount", "name": sa, "namespace": ns} in b["subjects"]]
    role = objects("Role")[binding["roleRef"]["name"]]
    assert role["metadata"]["namespace"] == ns == binding["metadata"]["namespace"]
    [leases] = [r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"]]
    assert leases["resources"] == ["leases"]
    assert {"get", "create", "update"} <= set(leases["verbs"])


def test_every_service_account_exists_and_only_the_watcher_gets_a_token() -> None:
    accounts = objects("ServiceAccount")
    for w in workloads():
        pod = w["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] in accounts
        if w["metadata"]["name"] != "portcullis-watcher":
            assert pod.get("automountServiceAccountToken") is False


# --------------------------------------------------------------------------- topics and ACLs


def test_every_topic_is_a_kafka_topic_as_the_contract_says() -> None:
    topics = objects("KafkaTopic")
    assert set(topics) == {spec.name(gen.PREFIX) for spec in SPECS}
    for spec in SPECS:
        t = topics[spec.name(gen.PREFIX)]["spec"]
        assert t["topicName"] == spec.name(gen.PREFIX)
        assert t["partitions"] == spec.partition_count(gen.PARTITIONS)
        assert t["replicas"] == gen.REPLICAS
        for key, value in spec.topic_configs().items():
            assert t["config"][key] == value, (spec.suffix, key)


def _acl_table() -> dict[str, tuple[set[str], set[str]]]:
    """deploy/acls.md's table: principal -> (writes, reads), topic suffixes."""
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in (DEPLOY / "acls.md").read_text().splitlines():
        m = re.match(r"\| `User:([\w-]+)`[^|]*\|([^|]*)\|([^|]*)\|", line)
        if m:
            def suffixes(cell: str) -> set[str]:
                return set(re.findall(r"`([\w.]+)`", cell))
            rows[m.group(1)] = (suffixes(m.group(2)), suffixes(m.group(3)))
    return rows


def test_acls_md_says_what_the_access_table_grants() -> None:
    table = _acl_table()
    for access in gen.ACCESS:
        if access.user == "portcullis-topics":
            continue
        assert access.user in table, f"deploy/acls.md has no row for User:{access.user}"
        writes, reads = table[access.user]
        assert writes == set(access.writes), access.user
        assert reads == set(access.reads), access.user
    assert set(table) <= {a.user for a in gen.ACCESS}


def test_kafka_users_grant_exactly_the_access_table() -> None:
    users = objects("KafkaUser")
    assert set(users) == {a.user for a in gen.ACCESS}
    for access in gen.ACCESS:
        granted: dict[str, set[str]] = {}
        for acl in users[access.user]["spec"]["authorization"]["acls"]:
            res = acl["resource"]
            if res["type"] == "topic" and res["patternType"] == "literal":
                granted.setdefault(res["name"].removeprefix(gen.PREFIX), set()).update(
                    acl["operations"])
        for suffix in {s.suffix for s in SPECS}:
            ops = granted.get(suffix, set())
            assert ("Read" in ops) == (suffix in access.reads), (access.user, suffix)
            assert ("Write" in ops) == (suffix in access.writes), (access.user, suffix)
            assert ("Create" in ops) == (suffix in access.creates), (access.user, suffix)


def _spec_names_used(package: str) -> set[str]:
    """Topic suffixes that a package's code names: imported spec constants, suffix strings."""
    by_const = {name: spec.suffix for name, spec in vars(sys.modules["topics.specs"]).items()
                if isinstance(spec, TopicSpec)}
    suffixes = {s.suffix for s in SPECS}
    used: set[str] = set()
    paths = [ROOT / package] if (ROOT / package).is_file() else (ROOT / package).rglob("*.py")
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "topics.specs":
                used |= {by_const[a.name] for a in node.names if a.name in by_const}
            elif isinstance(node, ast.Constant) and node.value in suffixes:
                used.add(node.value)
    return used


@pytest.mark.parametrize(("user", "code"), [
    ("portcullis-enforcer", "enforcers"),
    ("portcullis-streams", "streams/app.py"),
    ("portcullis-watcher", "portcullis/commands/watch.py"),
])
def test_the_access_table_covers_the_topics_the_code_uses(user: str, code: str) -> None:
    used = _spec_names_used(code)
    granted = gen.access_for(user).topics()
    assert used == granted, (f"{code} names topics {sorted(used)}, {user} is granted "
                             f"{sorted(granted)}: update ACCESS in {STRIMZI / 'generate.py'}")


def test_the_processor_owns_its_faust_topics_and_group() -> None:
    users = objects("KafkaUser")
    acls = users["portcullis-streams"]["spec"]["authorization"]["acls"]
    app_id = gen.PREFIX + "streams"  # StreamsConfig.app_id's default: <prefix>streams
    assert _parse(_container("portcullis-processor")[1]).group is None
    assert {"type": "topic", "name": app_id, "patternType": "prefix"} in [a["resource"]
                                                                          for a in acls]
    assert {"type": "group", "name": app_id, "patternType": "literal"} in [a["resource"]
                                                                           for a in acls]
