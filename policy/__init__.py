"""Portcullis policy language: Calico-compatible model, loading, compilation and verdicts.

Pure: nothing here does I/O beyond reading text handed to it.
"""

from policy.load import PolicyError, Problem, dump, load, load_document
from policy.model import (
    DEFAULT_TIER,
    EndpointPort,
    EntityRule,
    HostEndpoint,
    ICMPMatch,
    NetworkSet,
    Policy,
    PolicyObject,
    Port,
    Rule,
    ServiceAccountMatch,
    ServiceMatch,
    StagedPolicy,
    Tier,
)

__all__ = [
    "DEFAULT_TIER",
    "EndpointPort",
    "EntityRule",
    "HostEndpoint",
    "ICMPMatch",
    "NetworkSet",
    "Policy",
    "PolicyError",
    "PolicyObject",
    "Port",
    "Problem",
    "Rule",
    "ServiceAccountMatch",
    "ServiceMatch",
    "StagedPolicy",
    "Tier",
    "dump",
    "load",
    "load_document",
]
