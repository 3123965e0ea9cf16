"""Shared fixtures: real brokers started once per session, fresh topic prefixes, test tiers.

- `tansu_broker`, `kafka_broker`: session-scoped, started lazily on first use, stopped at the
  end; each is a `portcullis.brokers.Broker` with `.kind`, `.bootstrap` ("127.0.0.1:PORT")
  and `.log_path`.
- `broker`: the same, parametrised over both kinds (ids "tansu" and "kafka"), so a test that
  takes it runs against each.
- `topic_prefix`: a fresh prefix per test (e.g. "t3f9a1c2b."), so tests never see each
  other's topics, groups or data on the shared brokers.

Where Java or Maven is missing the Kafka tier is skipped with the reason; under CI=true it
fails instead. Tests marked `dataplane` (and everything under tests/dataplane) are skipped
without root / `ip netns` / ipset / iptables, and fail for that under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from portcullis.brokers import BROKERS, Broker, BrokerError, missing_kafka_tools

BROKER_KINDS = ["tansu", "kafka"]
BROKER_FIXTURES = {"broker", "tansu_broker", "kafka_broker"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip with a visible reason locally; in CI a missing tier is a failure, never a skip."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing test tier is a failure)", pytrace=False)
    pytest.skip(reason)


class BrokerPool:
    """Brokers started on first request and kept for the session; a failed start is remembered."""

    def __init__(self) -> None:
        self.brokers: dict[str, Broker] = {}
        self.failures: dict[str, str] = {}

    def get(self, kind: str) -> Broker:
        if kind in self.failures:
            pytest.fail(self.failures[kind], pytrace=False)
        if kind == "kafka":
            missing = missing_kafka_tools()
            if missing:
                skip_or_fail("Apache Kafka tier needs " + " and ".join(missing))
        broker = self.brokers.get(kind)
        if broker is None:
            broker = self._start(kind)
            self.brokers[kind] = broker
        self.check(kind, restart=True)
        return broker

    def _start(self, kind: str, attempts: int = 2) -> Broker:
        """Start on free ports; a second try covers a port taken between choosing and binding."""
        errors = []
        for _ in range(attempts):
            broker = BROKERS[kind]()
            try:
                return broker.start()
            except BrokerError as exc:
                errors.append(str(exc))
                broker.stop()
        self.failures[kind] = f"{kind} broker failed to start: " + "\nthen: ".join(errors)
        pytest.fail(self.failures[kind], pytrace=False)

    def check(self, kind: str, restart: bool) -> None:
        """Fail (naming the log) if the broker died; with `restart`, start it again instead.

        The test during which a broker dies fails at teardown; later tests get it restarted on
        the same port (its data is lost on Tansu), so one crash does not fail the whole session.
        """
        broker = self.brokers.get(kind)
        if broker is None or broker.running:
            return
        try:
            broker.check_alive()
            return
        except BrokerError as exc:
            died = f"{kind} broker died during the session: {exc}"
        if restart:
            warnings.warn(f"{died}\nrestarting it on {broker.bootstrap}", stacklevel=1)
            try:
                broker.stop()
                broker.start()
                return
            except BrokerError as exc:
                self.failures[kind] = f"{died}\nand restarting it failed: {exc}"
        pytest.fail(self.failures.get(kind, died), pytrace=False)

    def close(self) -> None:
        for broker in self.brokers.values():
            if broker.running:
                broker.cleanup()  # a dead broker keeps its work directory and log
            else:
                broker.stop()


@pytest.fixture(scope="session")
def broker_pool() -> Iterator[BrokerPool]:
    pool = BrokerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="session")
def tansu_broker(broker_pool: BrokerPool) -> Broker:
    return broker_pool.get("tansu")


@pytest.fixture(scope="session")
def kafka_broker(broker_pool: BrokerPool) -> Broker:
    return broker_pool.get("kafka")


@pytest.fixture(scope="session", params=BROKER_KINDS, ids=BROKER_KINDS)
def broker(request: pytest.FixtureRequest, broker_pool: BrokerPool) -> Broker:
    return broker_pool.get(request.param)


@pytest.fixture(autouse=True)
def _brokers_still_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """A broker that died fails the test it died in (naming its log), and is restarted before
    the next test that uses one, rather than leaving every later test to time out."""
    uses_broker = bool(BROKER_FIXTURES & set(request.fixturenames))
    pool: BrokerPool | None = request.getfixturevalue("broker_pool") if uses_broker else None
    if pool is not None:
        for kind in list(pool.brokers):
            pool.check(kind, restart=True)
    yield
    if pool is not None:
        for kind in list(pool.brokers):
            pool.check(kind, restart=False)


@pytest.fixture
def topic_prefix() -> str:
    """A fresh prefix for topic and group names: tests never see each other's data."""
    return f"t{uuid.uuid4().hex[:8]}."


# -- tiers ------------------------------------------------------------------------------


def _dataplane_missing() -> str | None:
    if os.geteuid() != 0:
        return "dataplane tests need root"
    for tool in ("ip", "ipset", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"dataplane tests need `{tool}` (Debian: iproute2, ipset, iptables)"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"dataplane tests need `ip netns`, which failed: {exc}"
    return None


_DATAPLANE_REASON: list[str | None] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dataplane_dir = Path(__file__).parent / "dataplane"
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
        if dataplane_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.dataplane)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("dataplane") is None:
        return
    if not _DATAPLANE_REASON:
        _DATAPLANE_REASON.append(_dataplane_missing())
    reason = _DATAPLANE_REASON[0]
    if reason:
        skip_or_fail(reason)
