"""The one HTTP server every long-running command uses: ``/metrics``, ``/healthz``, ``/readyz``.

Stdlib only, on a thread of its own: a wedged event loop cannot answer anything, so
its heartbeat goes stale and ``/healthz`` says so (the probe gets a 503 and a reason,
not a timeout). The verdicts are `topics.health`'s, the exposition `topics.metrics`'.

With ``PORTCULLIS_TEST_HOOKS=1`` in the environment (tests only) ``POST
/debug/stall?loop=NAME`` freezes that loop's heartbeat, as if the loop were wedged.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from topics.health import Health

log = logging.getLogger("portcullis.observe")

TEST_HOOKS_ENV = "PORTCULLIS_TEST_HOOKS"


def add_arguments(parser: argparse.ArgumentParser, max_age: float) -> None:
    """``--metrics-port``, ``--health-port`` and ``--health-max-age`` for a command."""
    group = parser.add_argument_group("metrics and health")
    group.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on this port (GET /metrics)")
    group.add_argument("--health-port", type=int, metavar="PORT",
                       help="serve GET /healthz (the loops are alive) and GET /readyz (caught "
                       "up) on this port: 200 or 503 with a short JSON body saying why "
                       "(may be the metrics port: one server then serves all three)")
    group.add_argument("--health-max-age", type=float, default=max_age, metavar="SECONDS",
                       help=f"a loop silent for longer is unhealthy (default {max_age:g})")


def check_arguments(args: argparse.Namespace) -> str | None:
    """An error message for bad flags, else None."""
    for flag, port in (("--metrics-port", args.metrics_port), ("--health-port", args.health_port)):
        if port is not None and not 0 < port < 65536:
            return f"{flag} must be 1-65535, got {port}"
    if args.health_max_age <= 0:
        return f"--health-max-age must be positive, got {args.health_max_age:g}"
    return None


class Server:
    """Serves the given routes on ``host:port`` from a daemon thread until `close`."""

    def __init__(self, port: int, routes: dict[str, Callable[[], tuple[int, str, bytes]]],
                 health: Health | None = None, host: str = "0.0.0.0") -> None:
        hooks = os.environ.get(TEST_HOOKS_ENV) == "1"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(urlsplit(self.path).path)
                if route is None:
                    self._send(404, "text/plain", f"not found; try {', '.join(routes)}\n".encode())
                    return
                try:
                    self._send(*route())
                except Exception as exc:  # a broken route must not kill the server
                    log.exception("serving %s failed", self.path)
                    self._send(500, "text/plain", f"{type(exc).__name__}: {exc}\n".encode())

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                loop = parse_qs(url.query).get("loop", [""])[0]
                if not (hooks and health is not None and url.path == "/debug/stall"):
                    self._send(404, "text/plain", b"not found\n")
                elif loop not in health.beats:
                    self._send(400, "text/plain", f"no loop {loop!r}\n".encode())
                else:
                    health.stall(loop)
                    log.warning("test hook: loop %s stalled", loop)
                    self._send(200, "text/plain", b"stalled\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"http:{port}",
                                        daemon=True)
        self._thread.start()
        log.info("serving %s on http://%s:%d", ", ".join(routes), host, self.port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def metrics_route(expose: Callable[[], str]) -> Callable[[], tuple[int, str, bytes]]:
    return lambda: (200, "text/plain; version=0.0.4", expose().encode())


def health_routes(health: Health) -> dict[str, Callable[[], tuple[int, str, bytes]]]:
    def answer(verdict: Callable[[], Any]) -> Callable[[], tuple[int, str, bytes]]:
        def route() -> tuple[int, str, bytes]:
            v = verdict()
            return v.status, "application/json", orjson.dumps(v.body) + b"\n"
        return route
    return {"/healthz": answer(health.healthz), "/readyz": answer(health.readyz)}


def start(args: argparse.Namespace, expose: Callable[[], str], health: Health) -> list[Server]:
    """The servers the flags ask for: one per distinct port (a shared port serves all)."""
    ports: dict[int, dict[str, Callable[[], tuple[int, str, bytes]]]] = {}
    if args.metrics_port:
        ports.setdefault(args.metrics_port, {})["/metrics"] = metrics_route(expose)
    if args.health_port:
        ports.setdefault(args.health_port, {}).update(health_routes(health))
    servers = []
    try:
        for port, routes in ports.items():
            servers.append(Server(port, routes, health))
    except OSError as exc:
        stop(servers)
        raise OSError(f"cannot serve on port {port}: {exc.strerror or exc}") from None
    return servers


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.close()
