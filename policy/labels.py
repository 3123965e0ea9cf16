"""Endpoint label sets as Calico builds them, so selectors see exactly what Felix sees.

A pod's workload endpoint carries its own labels plus ``projectcalico.org/namespace``,
``projectcalico.org/orchestrator`` and (for names shorter than 63 characters, as Calico's
conversion has it) ``projectcalico.org/serviceaccount``. It inherits, through the
namespace and service-account profiles, the namespace's labels prefixed ``pcns.`` (plus
``pcns.projectcalico.org/name``) and the service account's labels prefixed ``pcsa.`` (plus
``pcsa.projectcalico.org/name``). Felix lets an endpoint's own labels win over inherited
ones; ``pcns.``/``pcsa.`` labels a pod sets on itself are dropped, so a pod cannot claim to
be in a namespace or service account it is not in.
"""

from __future__ import annotations

from collections.abc import Mapping

NAMESPACE_LABEL = "projectcalico.org/namespace"
ORCHESTRATOR_LABEL = "projectcalico.org/orchestrator"
SERVICE_ACCOUNT_LABEL = "projectcalico.org/serviceaccount"
NAME_LABEL = "projectcalico.org/name"
NAMESPACE_PREFIX = "pcns."
SERVICE_ACCOUNT_PREFIX = "pcsa."
KUBERNETES_ORCHESTRATOR = "k8s"
_INHERITED_PREFIXES = (NAMESPACE_PREFIX, SERVICE_ACCOUNT_PREFIX)


def namespace_profile_labels(namespace: str, labels: Mapping[str, str]) -> dict[str, str]:
    """What Calico's ``kns.<namespace>`` profile applies: ``pcns.``-prefixed labels and name."""
    out = {NAMESPACE_PREFIX + key: value for key, value in labels.items()}
    out[NAMESPACE_PREFIX + NAME_LABEL] = namespace
    return out


def service_account_profile_labels(name: str, labels: Mapping[str, str]) -> dict[str, str]:
    """What Calico's ``ksa.<namespace>.<name>`` profile applies: ``pcsa.`` labels and name."""
    out = {SERVICE_ACCOUNT_PREFIX + key: value for key, value in labels.items()}
    out[SERVICE_ACCOUNT_PREFIX + NAME_LABEL] = name
    return out


def endpoint_labels(
    own: Mapping[str, str],
    *,
    namespace: str | None,
    service_account: str | None = None,
    namespace_labels: Mapping[str, str] | None = None,
    service_account_labels: Mapping[str, str] | None = None,
    orchestrator: str | None = KUBERNETES_ORCHESTRATOR,
) -> dict[str, str]:
    """The full label set selectors are evaluated against for one endpoint.

    ``namespace=None`` builds a global endpoint (host endpoint, GlobalNetworkSet): its own
    labels only, no namespace or orchestrator labels and nothing inherited. A namespaced
    endpoint gets the namespace and orchestrator labels (pass ``orchestrator=None`` for a
    namespaced NetworkSet, which Calico labels with its namespace only) and, when
    ``namespace_labels`` is given (the namespace is known), the inherited ``pcns.`` labels.
    """
    if namespace is None:
        return {k: v for k, v in own.items() if not k.startswith(_INHERITED_PREFIXES)}
    labels: dict[str, str] = {}
    if namespace_labels is not None:
        labels.update(namespace_profile_labels(namespace, namespace_labels))
    if service_account and service_account_labels is not None:
        labels.update(service_account_profile_labels(service_account, service_account_labels))
    for key, value in own.items():
        if not key.startswith(_INHERITED_PREFIXES):
            labels[key] = value
    labels[NAMESPACE_LABEL] = namespace
    if orchestrator is not None:
        labels[ORCHESTRATOR_LABEL] = orchestrator
    if service_account and len(service_account) < 63:
        labels[SERVICE_ACCOUNT_LABEL] = service_account
    return labels


def host_endpoint_labels(own: Mapping[str, str]) -> dict[str, str]:
    """A host endpoint's labels: its own, with nothing inherited and no namespace."""
    return endpoint_labels(own, namespace=None)


def network_set_labels(
    own: Mapping[str, str],
    namespace: str | None,
    namespace_labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A (Global)NetworkSet's labels.

    Namespaced sets carry ``projectcalico.org/namespace`` and inherit the namespace's
    ``pcns.`` labels (Calico gives them the ``kns.<namespace>`` profile); no orchestrator.
    """
    return endpoint_labels(
        own, namespace=namespace, namespace_labels=namespace_labels, orchestrator=None
    )


def effective_labels(
    kind: str,
    own: Mapping[str, str],
    *,
    namespace: str | None,
    service_account: str | None = None,
    namespace_labels: Mapping[str, str] | None = None,
    service_account_labels: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The labels selectors see for an endpoint of `kind` (``pod``, ``networkset``, …), with
    what it inherits, as Felix builds them: the one definition the processor and the
    enforcer share."""
    if kind == "pod":
        return endpoint_labels(
            own,
            namespace=namespace,
            service_account=service_account,
            namespace_labels=namespace_labels,
            service_account_labels=service_account_labels,
        )
    if kind == "networkset":
        return network_set_labels(own, namespace, namespace_labels)
    # Host endpoints, VMs and global network sets are cluster-scoped: own labels only.
    return endpoint_labels(own, namespace=None)
