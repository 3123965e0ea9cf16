"""List-then-watch, done right, with kubernetes-asyncio: one `ResourceWatcher` per resource.

The pattern (as client-go's reflector does it):

1. List, in pages (``limit``/``continue``), and hand the whole snapshot to the
   handler, which publishes what changed and tombstones what vanished.
2. Watch from the list's resourceVersion with bookmarks, remembering the
   latest resourceVersion seen (objects and bookmarks alike), and with a
   server-side ``timeoutSeconds`` shorter than the API server's, plus a
   client-side timeout a little longer, so a stalled stream is noticed.
3. When the stream ends normally, watch again from the latest resourceVersion.
4. On 410 Gone (history compacted while we were away): relist at once.
5. On a network or server error: back off exponentially (with jitter) and
   watch again from the latest resourceVersion; if the handler failed (Kafka
   down), relist instead, because the mirror is only committed on success.

Objects are handled as plain JSON dicts (parsed with orjson), never as
generated model classes: cheaper at thousands of pods, and the same code
serves custom resources.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from watchers.metrics import WatchMetrics

log = logging.getLogger(__name__)

WatchEvent = tuple[str, dict[str, Any]]  # ("ADDED" | "MODIFIED" | "DELETED", object)


class Gone(Exception):
    """The resourceVersion we asked for is too old (HTTP 410): the only cure is a relist."""


class WatchFailed(Exception):
    """The API server answered with an error we retry after a backoff."""


class HandlerFailed(Exception):
    """The handler (publishing) failed: resynchronise with a relist after a backoff."""


class Handler(Protocol):
    async def snapshot(self, resource: Resource, items: list[dict[str, Any]]) -> None: ...

    async def events(self, resource: Resource, events: Sequence[WatchEvent]) -> None: ...


ListMethod = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Resource:
    """A resource to watch: its name, the kubernetes-asyncio list method, and what items are."""

    name: str
    api_version: str
    kind: str
    list_method: Callable[[k8s.ApiClient], ListMethod]
    list_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def bind(self, api: k8s.ApiClient) -> ListMethod:
        return self.list_method(api)


def core(name: str, kind: str, method: str, **list_kwargs: Any) -> Resource:
    return Resource(
        name, "v1", kind, lambda api: getattr(k8s.CoreV1Api(api), method), list_kwargs
    )


def custom(group: str, version: str, plural: str, kind: str) -> Resource:
    """A custom resource, listed cluster-wide (every namespace for namespaced ones)."""
    return Resource(
        f"{plural}.{group}", f"{group}/{version}", kind,
        lambda api: k8s.CustomObjectsApi(api).list_cluster_custom_object,
        {"group": group, "version": version, "plural": plural},
    )


#: Ask for metadata only (PartialObjectMetadata), falling back to full objects on servers
#: that cannot: labels are all we need of namespaces and service accounts.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
_QUERY_NAMES = {
    "watch": "watch", "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks", "timeout_seconds": "timeoutSeconds",
    "limit": "limit", "_continue": "continue", "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
}


def metadata_only(name: str, kind: str, path: str) -> Resource:
    """A core resource listed and watched as metadata only (the generated client cannot:
    it always overwrites the Accept header), through the same ApiClient and credentials."""

    def bind(api: k8s.ApiClient) -> ListMethod:
        async def call(**kwargs: Any) -> Any:
            query = [(_QUERY_NAMES[k], v) for k, v in kwargs.items()
                     if k in _QUERY_NAMES and v is not None]
            accept = METADATA_WATCH if kwargs.get("watch") else METADATA_LIST
            return await api.call_api(
                path, "GET", query_params=query, header_params={"Accept": accept},
                auth_settings=["BearerToken"], _return_http_data_only=True,
                _preload_content=False, _request_timeout=kwargs.get("_request_timeout"),
            )
        return call

    return Resource(name, "v1", kind, bind)


#: Pods in every phase but the finished ones: a Pending pod with an IP is already an endpoint
#: (`translate.pod_is_workload_endpoint`). The server filters out Succeeded and Failed pods,
#: which spares us finished jobs (a pod that finishes is then sent as DELETED); it cannot
#: express the rest of Calico's rule (a terminating pod whose CNI released its IP), and test
#: servers (kmock) ignore field selectors, so `translate.pod_endpoint` tombstones finished
#: pods whatever the server sends.
POD_FIELD_SELECTOR = "status.phase!=Succeeded,status.phase!=Failed"
PODS = core("pods", "Pod", "list_pod_for_all_namespaces", field_selector=POD_FIELD_SELECTOR)
NAMESPACES = metadata_only("namespaces", "Namespace", "/api/v1/namespaces")
SERVICE_ACCOUNTS = metadata_only("serviceaccounts", "ServiceAccount", "/api/v1/serviceaccounts")
NODES = core("nodes", "Node", "list_node")
NETWORK_POLICIES = Resource(
    "networkpolicies.networking.k8s.io", "networking.k8s.io/v1", "NetworkPolicy",
    lambda api: k8s.NetworkingV1Api(api).list_network_policy_for_all_namespaces,
)
GROUP = "policy.portcullis.io"
GROUP_VERSION = "v1"
POLICY_RESOURCES = tuple(
    custom(GROUP, GROUP_VERSION, plural, kind)
    for plural, kind in (
        ("tiers", "Tier"),
        ("globalnetworkpolicies", "GlobalNetworkPolicy"),
        ("networkpolicies", "NetworkPolicy"),
        ("globalnetworksets", "GlobalNetworkSet"),
        ("networksets", "NetworkSet"),
        ("hostendpoints", "HostEndpoint"),
        ("stagedglobalnetworkpolicies", "StagedGlobalNetworkPolicy"),
        ("stagednetworkpolicies", "StagedNetworkPolicy"),
        ("stagedkubernetesnetworkpolicies", "StagedKubernetesNetworkPolicy"),
    )
)


@dataclass(frozen=True)
class WatchOptions:
    """Timeouts and backoff. The API server's own watch timeout is 30-60 min; ours is shorter."""

    page_size: int = 500
    timeout_seconds: int = 300
    request_slack: float = 30.0
    list_timeout: float = 120.0
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0
    errors: int = 0


class ResourceWatcher:
    """Keeps a handler in step with one resource, through timeouts, 410s and dropped connections."""

    def __init__(
        self, api: k8s.ApiClient, resource: Resource, handler: Handler,
        options: WatchOptions | None = None, metrics: WatchMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.resource = resource
        self.handler = handler
        self.options = options or WatchOptions()
        self.resource_version: str | None = None
        self.stats = WatchStats()
        self.synced = asyncio.Event()  # set after the first successful list
        self._list = resource.bind(api)

    async def run(self) -> None:
        """Run until cancelled."""
        delay = self.options.backoff_initial
        gone_in_a_row = 0
        while True:
            try:
                if self.resource_version is None:
                    await self.relist()
                started = time.monotonic()
                received = await self.watch_once()
                gone_in_a_row = 0
                if received or time.monotonic() - started > 1.0:
                    delay = self.options.backoff_initial
                else:  # a stream that ends at once with nothing in it: do not spin
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.options.backoff_max)
            except Gone as exc:
                self.stats.gone += 1
                gone_in_a_row += 1
                log.info("%s: %s; relisting", self.resource.name, exc)
                self.resource_version = None
                if gone_in_a_row > 1:  # relists that expire at once: do not hammer the server
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.options.backoff_max)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # network, server and handler errors all back off
                self.stats.errors += 1
                if self.metrics is not None:
                    self.metrics.errors.inc(resource=self.resource.name)
                if isinstance(exc, HandlerFailed):
                    self.resource_version = None
                sleep = delay * (0.5 + random.random() / 2)
                log.warning(
                    "%s: %s: %s; retrying in %.1fs%s%s", self.resource.name, type(exc).__name__,
                    exc, sleep, " with a relist" if self.resource_version is None else "",
                    _hint(exc),
                )
                await asyncio.sleep(sleep)
                delay = min(delay * 2, self.options.backoff_max)

    async def relist(self) -> None:
        """List every object (in pages) and hand the snapshot over; remember its version."""
        items: list[dict[str, Any]] = []
        cont: str | None = None
        rv: str | None = None
        while True:
            kwargs: dict[str, Any] = dict(self.resource.list_kwargs)
            kwargs["limit"] = self.options.page_size
            if cont:
                kwargs["_continue"] = cont
            timeout = aiohttp.ClientTimeout(
                total=self.options.list_timeout, sock_connect=self.options.connect_timeout
            )
            resp = await self._list(**kwargs, _preload_content=False, _request_timeout=timeout)
            try:
                body = await resp.read()
                _check_status(resp.status, body)
            finally:
                resp.release()
            data = orjson.loads(body)
            for item in data.get("items") or []:
                item.setdefault("apiVersion", self.resource.api_version)
                item.setdefault("kind", self.resource.kind)
                items.append(item)
            meta = data.get("metadata") or {}
            rv = meta.get("resourceVersion") or rv
            cont = meta.get("continue") or None
            if not cont:
                break
        self.stats.lists += 1
        try:
            await self.handler.snapshot(self.resource, items)
        except Exception as exc:
            raise HandlerFailed(f"handling the list failed: {exc}") from exc
        self.resource_version = rv
        if self.metrics is not None:
            self.metrics.listed(self.resource.name, len(items))
        self.synced.set()
        log.info("%s: listed %d object(s) at resourceVersion %s",
                 self.resource.name, len(items), rv)

    async def watch_once(self) -> int:
        """One watch request from the latest resourceVersion; returns how many lines it read."""
        opts = self.options
        timeout = aiohttp.ClientTimeout(
            total=opts.timeout_seconds + opts.request_slack, sock_connect=opts.connect_timeout
        )
        resp = await self._list(
            **self.resource.list_kwargs,
            watch=True,
            resource_version=self.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=opts.timeout_seconds,
            _preload_content=False,
            _request_timeout=timeout,
        )
        self.stats.watches += 1
        received = 0
        try:
            if resp.status != 200:
                _check_status(resp.status, await resp.read())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                if b"\n" not in buffer:
                    continue
                *lines, buffer = buffer.split(b"\n")
                received += await self._handle_lines(lines)
            if buffer.strip():  # the server closed cleanly after a last line without newline
                received += await self._handle_lines([buffer])
        finally:
            resp.release()
        return received

    async def _handle_lines(self, lines: list[bytes]) -> int:
        events: list[WatchEvent] = []
        latest = self.resource_version
        count = 0
        for line in lines:
            if not line.strip():
                continue
            count += 1
            event = orjson.loads(line)
            kind = event.get("type")
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion") or None
            if kind == "ERROR":
                code = obj.get("code")
                if code == 410:
                    raise Gone(f"watch: {obj.get('reason')}: {obj.get('message')}")
                raise WatchFailed(f"watch error {code}: {obj.get('reason')}: {obj.get('message')}")
            if self.metrics is not None and kind in ("BOOKMARK", "ADDED", "MODIFIED", "DELETED"):
                self.metrics.watched(self.resource.name, kind)
            if kind == "BOOKMARK":
                self.stats.bookmarks += 1
            elif kind in ("ADDED", "MODIFIED", "DELETED"):
                obj.setdefault("apiVersion", self.resource.api_version)
                obj.setdefault("kind", self.resource.kind)
                events.append((kind, obj))
            else:
                log.warning("%s: ignoring unknown watch event type %r", self.resource.name, kind)
                continue
            if rv:
                latest = str(rv)
        if events:
            try:
                await self.handler.events(self.resource, events)
            except Exception as exc:
                raise HandlerFailed(f"handling {len(events)} event(s) failed: {exc}") from exc
            self.stats.events += len(events)
        self.resource_version = latest
        return count


def _hint(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    if status == 404:
        return " (is the resource served? for ours: kubectl apply -f deploy/crds/)"
    if status in (401, 403):
        return " (not allowed: see deploy/rbac.yaml for what the watcher needs)"
    return ""


def _check_status(status: int, body: bytes) -> None:
    if 200 <= status < 300:
        return
    try:
        data = orjson.loads(body)
        message = f"{data.get('reason')}: {data.get('message')}"
    except orjson.JSONDecodeError:
        message = body[:200].decode("utf-8", "replace")
    if status == 410:
        raise Gone(f"list: {message}")
    raise ApiException(status=status, reason=message)


async def run_all(watchers: Sequence[ResourceWatcher]) -> None:
    """Run every watcher until cancelled (one failing to reach the API does not stop the others)."""
    async with asyncio.TaskGroup() as group:
        for watcher in watchers:
            group.create_task(watcher.run(), name=f"watch {watcher.resource.name}")


def now() -> float:
    return time.time()
