"""Settings for every subcommand: flags override environment, which overrides a config file."""

from __future__ import annotations

import argparse
import getpass
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "PORTCULLIS_"


class SettingsError(ValueError):
    """A setting is missing, malformed or contradictory."""


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach the brokers; passed through to aiokafka and Faust."""

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka producers, consumers and the admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topic_prefix: str = "portcullis."
    partitions: int = 8
    replication_factor: int = 1
    actor: str = field(default_factory=lambda: _default_actor())
    log_level: str = "INFO"


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


_KAFKA_FIELDS = {f.name for f in fields(KafkaSettings)}
_TOP_FIELDS = {f.name for f in fields(Settings)} - {"kafka"}
_INT_FIELDS = {"partitions", "replication_factor"}


def add_arguments(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """The connection flags every subcommand accepts. ``nested``: for a sub-subcommand's
    parser, whose flags must not overwrite those given before the sub-subcommand."""
    group = parser.add_argument_group("connection (also PORTCULLIS_<NAME> or --config)")

    group.add_argument("--config", metavar="FILE", help="YAML settings file")
    group.add_argument("--bootstrap", help="Kafka bootstrap servers, host:port[,host:port]")
    group.add_argument("--topic-prefix", help="prefix of every topic name (default portcullis.)")
    group.add_argument("--partitions", type=int, help="partitions per partitioned topic")
    group.add_argument(
        "--security-protocol", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
    )
    group.add_argument("--ssl-cafile")
    group.add_argument("--ssl-certfile")
    group.add_argument("--ssl-keyfile")
    group.add_argument("--sasl-mechanism", choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    group.add_argument("--sasl-username")
    group.add_argument("--sasl-password")
    if not nested:  # a nested command may use --actor for something of its own
        group.add_argument("--actor", help="who is acting, recorded on published policies")
    group.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    if nested:
        for action in group._group_actions:
            action.default = argparse.SUPPRESS


def _coerce(name: str, value: Any, origin: str) -> Any:
    if name in _INT_FIELDS:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{origin}: {name}: expected an integer, got {value!r}") from None
        if number < 1:
            raise SettingsError(f"{origin}: {name}: must be at least 1, got {number}")
        return number
    if value is not None and not isinstance(value, str):
        raise SettingsError(f"{origin}: {name}: expected a string, got {value!r}")
    return value


def _from_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "kafka" and isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[str(sub).replace("-", "_")] = (f"{path}: kafka.{sub}", subvalue)
        else:
            flat[str(key).replace("-", "_")] = (f"{path}: {key}", value)
    return flat


def load(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from config file, then environment, then flags (last wins)."""
    env = os.environ if environ is None else environ
    raw: dict[str, tuple[str, Any]] = {}
    config = getattr(args, "config", None) or env.get(ENV_PREFIX + "CONFIG")
    if config:
        raw.update(_from_file(config))
    for name in _KAFKA_FIELDS | _TOP_FIELDS:
        if (value := env.get(ENV_PREFIX + name.upper())) is not None:
            raw[name] = (f"environment {ENV_PREFIX}{name.upper()}", value)
    for name in _KAFKA_FIELDS | _TOP_FIELDS:
        if args is not None and getattr(args, name, None) is not None:
            raw[name] = (f"flag --{name.replace('_', '-')}", getattr(args, name))
    unknown = sorted(set(raw) - _KAFKA_FIELDS - _TOP_FIELDS)
    if unknown:
        origin = raw[unknown[0]][0]
        raise SettingsError(f"{origin}: unknown setting {unknown[0]!r}")
    kafka = replace(
        KafkaSettings(),
        **{k: _coerce(k, v, o) for k, (o, v) in raw.items() if k in _KAFKA_FIELDS},
    )
    top = {k: _coerce(k, v, o) for k, (o, v) in raw.items() if k in _TOP_FIELDS}
    return replace(Settings(kafka=kafka), **top)
