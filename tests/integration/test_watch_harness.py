"""What kmock's KubernetesEmulator lacks, scripted with kmock reactions (not another mock).

The emulator stores the objects (created, patched and deleted through its HTTP
API) and serves fetches. Reactions added here give it what a watcher needs:

* lists with a real ``metadata.resourceVersion`` and ``limit``/``continue`` pages
  (from a consistent snapshot);
* watch streams (kubernetes-asyncio sends ``watch=True``, which the emulator
  does not recognise) that start *after* the requested resourceVersion, honour
  ``timeoutSeconds``, and send BOOKMARK events when idle;
* faults on demand: 410 Gone (the history before now is compacted), dropped
  connections (mid-line), paused streams, slow lists and stalled streams.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import itertools
from typing import Any

import kmock
from kmock._internal import parsing

_parse_path = parsing.parse_path


def _parse_path_with_namespaces(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads ``/api/v1/namespaces[/NAME]`` as a namespace prefix and fails; the
    Namespace resource itself lives there. (Its parser runs before any reaction can help.)"""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4
                                  else None, None)
    return _parse_path(path)


parsing.parse_path = _parse_path_with_namespaces


class ScriptedKubernetes:
    def __init__(self, server: kmock.KubernetesEmulator, resources: list[tuple[str, str, str]]):
        self.kmock = server
        self.rv = 0
        self.horizon = 0  # watches from a version below this get 410 Gone
        self.paused = False  # streams deliver nothing (events still happen)
        self.stalled = False  # new streams send headers and then nothing, ignoring timeouts
        self.list_delay = 0.0
        self.bookmark_interval = 0.2
        self.kinds: dict[str, tuple[str, str]] = {}  # "apiVersion/plural" -> (apiVersion, kind)
        self._rvs: dict[str, list[int]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._generation = 0  # bumped to end open streams
        self._ending: tuple[str, ...] = ()
        self.live_streams = 0  # watch streams currently delivering
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        self._tokens = itertools.count(1)
        self._lock = asyncio.Lock()
        self.watch_requests: list[dict[str, str]] = []
        self.list_requests: list[dict[str, str]] = []
        self.accept_headers: list[str] = []
        for api_version, plural, kind in resources:
            group, _, version = api_version.rpartition("/")
            res = kmock.resource(group, version, plural)
            rid = f"{api_version}/{plural}"
            self.kinds[rid] = (api_version, kind)
            self._rvs[rid] = []
            self._events[rid] = []
            server[res][self._is_watch] << self._watch_handler(rid)
            server["list", res][self._is_list] << self._list_handler(rid)

    def rid(self, name: str) -> str:
        """A resource id (``apiVersion/plural``) from itself or an unambiguous plural."""
        if name in self.kinds:
            return name
        found = [rid for rid in self.kinds if rid.endswith("/" + name)]
        assert len(found) == 1, f"ambiguous or unknown resource {name!r}: {found}"
        return found[0]

    # -- reactions --------------------------------------------------------

    @staticmethod
    def _is_watch(request: kmock.Request) -> bool:
        return request.method == "GET" and request.params.get("watch", "").lower() == "true"

    @staticmethod
    def _is_list(request: kmock.Request) -> bool:
        return request.params.get("watch", "").lower() != "true"

    def _objects(self, rid: str) -> list[dict[str, Any]]:
        api_version, kind = self.kinds[rid]
        wanted = self._res(rid)
        out = []
        for (res, _ns, _name), obj in self.kmock.objects.items():
            if res == wanted and not obj.deleted:
                item = copy.deepcopy(obj.raw)
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                out.append(item)
        out.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return out

    def _list_handler(self, rid: str) -> Any:
        async def serve(request: kmock.Request) -> dict[str, Any]:
            self.list_requests.append(dict(request.params))
            self.accept_headers.append(request.headers.get("Accept", ""))
            if self.list_delay:
                await asyncio.sleep(self.list_delay)
            token = request.params.get("continue")
            if token:
                snapshot_rv, offset = token.split(":")
                items = self._snapshots[snapshot_rv]
                rv = snapshot_rv
                start = int(offset)
            else:
                async with self._lock:
                    items = self._objects(rid)
                    rv = str(self.rv)
                start = 0
            limit = int(request.params.get("limit") or 0) or len(items) or 1
            page = items[start:start + limit]
            meta: dict[str, Any] = {"resourceVersion": rv}
            if start + limit < len(items):
                meta["continue"] = f"{rv}:{start + limit}"
                self._snapshots[rv] = items
            api_version, kind = self.kinds[rid]
            return {"apiVersion": api_version, "kind": kind + "List", "metadata": meta,
                    "items": page}
        return serve

    def _watch_handler(self, rid: str) -> Any:
        def serve(request: kmock.Request) -> Any:
            self.watch_requests.append(dict(request.params))
            self.accept_headers.append(request.headers.get("Accept", ""))
            return self._stream(rid, request)
        return serve

    async def _stream(self, rid: str, request: kmock.Request) -> Any:
        loop = asyncio.get_running_loop()
        since = int(request.params.get("resourceVersion") or 0)
        timeout = float(request.params.get("timeoutSeconds") or 60)
        bookmarks = request.params.get("allowWatchBookmarks", "").lower() == "true"
        deadline = loop.time() + timeout
        generation = self._generation
        yield b""  # send the headers now, like the API server does
        if self.stalled:
            while self.stalled:  # a server that hangs and ignores its own timeout
                await asyncio.sleep(0.05)
            return
        if since < self.horizon:
            yield self._gone()
            return
        self.live_streams += 1
        try:
            cursor = since
            while True:
                if generation != self._generation:
                    ending = self._ending
                    if ending[0] == "gone":
                        yield self._gone()
                        return
                    if ending[0] == "drop":
                        yield b'{"type": "MODIFIED", "object": {"metadata": {"na'
                        await asyncio.sleep(0.01)
                        transport = request._raw_request.transport  # type: ignore[union-attr]
                        if transport is not None:
                            transport.abort()
                        return
                if not self.paused:
                    rvs = self._rvs[rid]
                    start = bisect.bisect_right(rvs, cursor)
                    if start < len(rvs):
                        for event in self._events[rid][start:]:
                            yield event
                        cursor = rvs[-1]
                        continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return  # the server-side timeout: a clean end of stream
                woken = await self._wait(min(self.bookmark_interval, remaining))
                if not woken and bookmarks and not self.paused and generation == self._generation:
                    rvs = self._rvs[rid]
                    if bisect.bisect_right(rvs, cursor) == len(rvs):  # caught up: safe to bookmark
                        cursor = self.rv
                        yield self._bookmark(rid, cursor)
        finally:
            self.live_streams -= 1

    async def _wait(self, timeout: float) -> bool:
        """Wait for a change (never yield while holding the lock: streams can be abandoned)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return False
            return True

    def _bookmark(self, rid: str, rv: int) -> dict[str, Any]:
        api_version, kind = self.kinds[rid]
        return {"type": "BOOKMARK", "object": {
            "apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": str(rv)},
        }}

    @staticmethod
    def _gone() -> dict[str, Any]:
        return {"type": "ERROR", "object": {
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        }}

    # -- faults -----------------------------------------------------------

    async def _end_streams(self, how: str) -> None:
        async with self._changed:
            self._ending = (how,)
            self._generation += 1
            self._changed.notify_all()

    async def expire(self) -> None:
        """Compact the history: open and future watches from before now get 410 Gone."""
        self.horizon = self.rv
        await self._end_streams("gone")

    async def drop_connections(self) -> None:
        """Abort every open watch stream's TCP connection, in the middle of a line.

        Waits for a stream to be open first, so the drop always hits one.
        """
        for _ in range(200):
            if self.live_streams:
                break
            await asyncio.sleep(0.05)
        await self._end_streams("drop")

    async def resume(self) -> None:
        self.paused = False
        async with self._changed:
            self._changed.notify_all()

    # -- changes through the emulator's HTTP API ---------------------------

    def _path(self, rid: str, namespace: str | None, name: str | None = None) -> str:
        api_version, _kind = self.kinds[rid]
        plural = rid.rsplit("/", 1)[1]
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        return f"{path}/{name}" if name else path

    async def _record(self, rid: str, kind: str, obj: dict[str, Any]) -> None:
        # kmock matches every request against every request it ever recorded (a view's
        # `in` walks its history), which is quadratic over thousands of requests. Forget
        # all but the most recent ones (in-flight requests are among those).
        del self.kmock._requests[:-10]
        api_version, k = self.kinds[rid]
        obj = copy.deepcopy(obj)
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", k)
        async with self._changed:
            self._rvs[rid].append(int(obj["metadata"]["resourceVersion"]))
            self._events[rid].append({"type": kind, "object": obj})
            self._changed.notify_all()

    async def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        rid = self.rid(resource)
        async with self._lock:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            ns = obj["metadata"].get("namespace")
            async with self.kmock.post(self._path(rid, ns), json=obj) as resp:
                assert resp.status in (200, 201), await resp.text()
                stored = await resp.json()
            await self._record(rid, "ADDED", stored)
            return stored

    async def patch(
        self, resource: str, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        rid = self.rid(resource)
        async with self._lock:
            self.rv += 1
            patch = copy.deepcopy(patch)
            patch.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
            async with self.kmock.patch(self._path(rid, namespace, name), json=patch) as resp:
                assert resp.status == 200, await resp.text()
            stored = copy.deepcopy(self.kmock.objects[self._res(rid), namespace, name].raw)
            await self._record(rid, "MODIFIED", stored)
            return stored

    async def delete(self, resource: str, namespace: str | None, name: str) -> None:
        rid = self.rid(resource)
        async with self._lock:
            self.rv += 1
            async with self.kmock.delete(self._path(rid, namespace, name)) as resp:
                assert resp.status == 200, await resp.text()
                last = await resp.json()
            last["metadata"]["resourceVersion"] = str(self.rv)
            await self._record(rid, "DELETED", last)

    def _res(self, rid: str) -> kmock.resource:
        api_version, _kind = self.kinds[rid]
        group, _, version = api_version.rpartition("/")
        return kmock.resource(group, version, rid.rsplit("/", 1)[1])

    def live(self, resource: str) -> list[dict[str, Any]]:
        return self._objects(self.rid(resource))


def pod(namespace: str, name: str, ip: str, labels: dict[str, str] | None = None,
        phase: str = "Running", node: str = "node-1") -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": []},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]},
    }


# -- the script itself behaves like an API server where the watcher relies on it ----------


async def test_pages_come_from_one_snapshot_and_old_versions_are_gone(
    kmock: kmock.KubernetesEmulator,
) -> None:
    import json

    api = ScriptedKubernetes(kmock, [("v1", "pods", "Pod")])
    for i in range(3):
        await api.create("pods", pod("ns", f"p{i}", f"10.0.0.{i + 1}"))
    first = await (await kmock.get("/api/v1/pods?limit=2")).json()
    assert [o["metadata"]["name"] for o in first["items"]] == ["p0", "p1"]
    await api.create("pods", pod("ns", "late", "10.0.0.9"))  # not in the snapshot
    rest = await (await kmock.get(
        f"/api/v1/pods?limit=2&continue={first['metadata']['continue']}")).json()
    assert [o["metadata"]["name"] for o in rest["items"]] == ["p2"]
    assert rest["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"] == "3"

    await api.expire()
    async with kmock.get("/api/v1/pods?watch=True&resourceVersion=3") as resp:
        event = json.loads(await resp.content.readline())
    assert (event["type"], event["object"]["code"]) == ("ERROR", 410)
    async with kmock.get(f"/api/v1/pods?watch=True&resourceVersion={api.rv}"
                         "&timeoutSeconds=1&allowWatchBookmarks=true") as resp:
        event = json.loads(await resp.content.readline())
    assert event["type"] == "BOOKMARK"


class Leases:
    """coordination.k8s.io/v1 Leases with what leader election relies on, as kmock reactions:
    a ``resourceVersion`` bumped by every write, 409 Conflict on a replace at a stale
    version (optimistic concurrency), 404 for none. (A second create is refused with 409
    by the emulator itself, before any reaction: it tracks created objects.)"""

    def __init__(self, server: kmock.KubernetesEmulator) -> None:
        self.objects: dict[tuple[str | None, str], dict[str, Any]] = {}
        self.versions = itertools.count(1)
        self.writes: list[tuple[str, str | None]] = []  # (name, holder) of every write
        self.conflicts = 0
        #: writes naming these holders hang until `unhang` (a leader cut off from the API)
        self.hang_writes_of: set[str] = set()
        self._unhung = asyncio.Event()
        server[kmock.resource("coordination.k8s.io", "v1", "leases")] << self._serve

    async def _hang(self) -> kmock.Response:
        await self._unhung.wait()
        return self._status(503, "ServiceUnavailable", "the scripted partition ended")

    def unhang(self) -> None:
        self.hang_writes_of.clear()
        self._unhung.set()

    @staticmethod
    def _status(code: int, reason: str, message: str) -> kmock.Response:
        return kmock.Response(status=code, payload={
            "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
            "reason": reason, "message": message})

    def _serve(self, request: kmock.Request) -> Any:
        """Every answer names its status: kmock keeps the last one given on the reaction."""
        import orjson

        method = next(m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                      if request.method == m)
        if method == "GET" and request.name:
            found = self.objects.get((request.namespace, request.name))
            if found is None:
                return self._status(404, "NotFound", f"leases {request.name!r} not found")
            return kmock.Response(status=200, payload=copy.deepcopy(found))
        body = orjson.loads(request.body) if request.body else {}
        if self.hang_writes_of and (body.get("spec") or {}).get("holderIdentity") in (
                self.hang_writes_of):
            return self._hang()
        name = request.name or (body.get("metadata") or {}).get("name")
        key = (request.namespace, name)
        if method == "POST":
            if key in self.objects:
                return self._status(409, "AlreadyExists", f"leases {name!r} already exists")
            return self._store(key, body, 201)
        if method == "PUT":
            found = self.objects.get(key)
            if found is None:
                return self._status(404, "NotFound", f"leases {name!r} not found")
            sent = (body.get("metadata") or {}).get("resourceVersion")
            if sent != found["metadata"]["resourceVersion"]:
                self.conflicts += 1
                return self._status(409, "Conflict", "the object has been modified; please "
                                    "apply your changes to the latest version and try again")
            return self._store(key, body, 200)
        return self._status(405, "MethodNotAllowed", f"{method} is not scripted for leases")

    def _store(self, key: tuple[str | None, str], body: dict[str, Any], code: int) -> Any:
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", "coordination.k8s.io/v1")
        obj.setdefault("kind", "Lease")
        obj["metadata"] = dict(obj.get("metadata") or {}, name=key[1], namespace=key[0],
                               resourceVersion=str(next(self.versions)))
        self.objects[key] = obj
        self.writes.append((key[1], (obj.get("spec") or {}).get("holderIdentity")))
        return kmock.Response(status=code, payload=copy.deepcopy(obj))

    def holder(self, namespace: str, name: str) -> str | None:
        found = self.objects.get((namespace, name))
        return None if found is None else (found.get("spec") or {}).get("holderIdentity")


async def test_leases_are_written_with_optimistic_concurrency(
    kmock: kmock.KubernetesEmulator,
) -> None:
    leases = Leases(kmock)
    path = "/apis/coordination.k8s.io/v1/namespaces/ns/leases"
    lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}
    async with kmock.get(f"{path}/l") as resp:
        assert resp.status == 404
    async with kmock.post(path, json=lease) as resp:
        assert resp.status == 201
        first = await resp.json()
    async with kmock.post(path, json=lease) as resp:
        assert resp.status == 409  # the emulator itself refuses a second create
    mine = copy.deepcopy(first)
    mine["spec"]["holderIdentity"] = "b"
    async with kmock.put(f"{path}/l", json=mine) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    stale = copy.deepcopy(first)
    stale["spec"]["holderIdentity"] = "c"
    async with kmock.put(f"{path}/l", json=stale) as resp:  # written at an old version
        assert resp.status == 409 and (await resp.json())["reason"] == "Conflict"
    async with kmock.get(f"{path}/l") as resp:
        assert (await resp.json())["spec"]["holderIdentity"] == "b"
    assert leases.holder("ns", "l") == "b" and leases.conflicts == 1
