"""Writes the Strimzi KafkaTopic and KafkaUser examples from the topic contract.

Topics come from `topics.specs` (partitions, cleanup.policy, retention); users and
their ACLs from `ACCESS` below, the one table of who reads and writes what. The
unit tests check that the YAML files are up to date, that `ACCESS` covers every
topic each component's code names, and that deploy/acls.md says the same.

Run ``python deploy/kubernetes/strimzi/generate.py`` after changing the topics or ACCESS.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from topics.specs import SPECS  # noqa: E402

#: The Strimzi Kafka cluster of kafka.yaml; KafkaTopics and KafkaUsers name it.
CLUSTER = "portcullis-kafka"
NAMESPACE = "portcullis"
PREFIX = "portcullis."
#: Partitions of every partitioned topic (PORTCULLIS_PARTITIONS in kafka-config.yaml).
PARTITIONS = 12
#: Replicas of every topic (PORTCULLIS_REPLICATION_FACTOR in kafka-config.yaml).
REPLICAS = 3
READ_OPS = ("Read", "Describe", "DescribeConfigs")
WRITE_OPS = ("Write", "Describe", "DescribeConfigs")


@dataclass(frozen=True)
class Access:
    """What one principal may do: topic suffixes it reads and writes, and more."""

    user: str
    runs: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    creates: tuple[str, ...] = ()
    #: Topic name prefixes (after PREFIX) it owns entirely (Faust's changelogs).
    owns_prefix: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    def topics(self) -> set[str]:
        return set(self.reads) | set(self.writes) | set(self.creates)


_ALL = tuple(spec.suffix for spec in SPECS)
ACCESS: tuple[Access, ...] = (
    Access("portcullis-watcher", "portcullis watch kubernetes|hosts",
           reads=("endpoints", "profiles", "policies"),
           writes=("endpoints", "endpoints.history", "profiles", "profiles.history",
                   "policies", "policies.history")),
    Access("portcullis-streams", "portcullis process",
           reads=("endpoints", "profiles", "policies", "selectors"),
           writes=("selectors", "memberships", "deadletter"),
           owns_prefix=("streams",), groups=("streams",)),
    Access("portcullis-enforcer", "portcullis enforce",
           reads=("policies", "profiles", "memberships", "endpoints"),
           writes=("deadletter", "dns", "flows")),
    Access("portcullis-topics", "portcullis topics create", creates=_ALL),
    Access("portcullis-policy", "portcullis apply / delete",
           reads=("endpoints", "profiles", "policies", "flows"),
           writes=("policies", "policies.history", "endpoints", "endpoints.history")),
    Access("portcullis-reader", "portcullis get / audit / explain / flows",
           reads=("endpoints", "profiles", "policies", "endpoints.history",
                  "profiles.history", "policies.history", "flows", "dns")),
)


def access_for(user: str) -> Access:
    return next(a for a in ACCESS if a.user == user)


def _labels() -> dict[str, str]:
    return {"strimzi.io/cluster": CLUSTER, "app.kubernetes.io/part-of": "portcullis"}


def kafka_topics() -> list[dict[str, Any]]:
    docs = []
    for spec in SPECS:
        docs.append({
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {"name": spec.name(PREFIX), "namespace": NAMESPACE, "labels": _labels()},
            "spec": {
                "topicName": spec.name(PREFIX),
                "partitions": spec.partition_count(PARTITIONS),
                "replicas": REPLICAS,
                "config": {**spec.topic_configs(), "min.insync.replicas": "2"},
            },
        })
    return docs


def _acl(kind: str, name: str, ops: list[str], pattern: str = "literal") -> dict[str, Any]:
    return {"resource": {"type": kind, "name": name, "patternType": pattern},
            "operations": ops, "host": "*"}


def acls(access: Access) -> list[dict[str, Any]]:
    out = []
    for spec in SPECS:  # in the contract's order, one rule per topic
        ops: list[str] = []
        if spec.suffix in access.creates:
            ops += ["Create", "Describe", "DescribeConfigs"]
        if spec.suffix in access.reads:
            ops += READ_OPS
        if spec.suffix in access.writes:
            ops += WRITE_OPS
        if ops:
            out.append(_acl("topic", spec.name(PREFIX), list(dict.fromkeys(ops))))
    for prefix in access.owns_prefix:
        out.append(_acl("topic", PREFIX + prefix,
                        ["Create", "Read", "Write", "Describe", "DescribeConfigs"], "prefix"))
    for group in access.groups:
        out.append(_acl("group", PREFIX + group, ["Read", "Describe"]))
    return out


def kafka_users() -> list[dict[str, Any]]:
    return [{
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaUser",
        "metadata": {"name": a.user, "namespace": NAMESPACE, "labels": _labels(),
                     "annotations": {"portcullis.io/runs": a.runs}},
        "spec": {
            "authentication": {"type": "scram-sha-512"},
            "authorization": {"type": "simple", "acls": acls(a)},
        },
    } for a in ACCESS]


def _dump(docs: list[dict[str, Any]], what: str) -> str:
    header = (f"# Generated by deploy/kubernetes/strimzi/generate.py: {what}\n"
              "# (edit the generator or topics/specs.py, not this file)\n")
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)


def files() -> dict[Path, str]:
    return {
        HERE / "topics.yaml": _dump(kafka_topics(), "a KafkaTopic per topic of topics/specs.py"),
        HERE / "users.yaml": _dump(kafka_users(), "a KafkaUser per principal, ACLs from ACCESS"),
    }


def main() -> int:
    for path, text in files().items():
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
