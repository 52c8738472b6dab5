"""A Kubernetes cluster for the k8s end-to-end tests, made of two test doubles:

- ApiServer: kmock's KubernetesEmulator (a real HTTP server on 127.0.0.1) standing in for the API server,
  with what the launcher needs of a real one added here: uid/resourceVersion/creationTimestamp on create,
  labelSelector and fieldSelector (equality only) on list and watch, timeoutSeconds on watch, and the
  pods/log subresource (served from the pod runner's files).
  What the emulator does NOT check that a real API server would: no schema validation or defaulting
  (a 422 never happens; a body's namespace is not checked against the URL's), no admission, RBAC or quota (no 403), no garbage collection of owned objects
  (ownerReferences are stored, not followed), no graceful pod deletion (a deleted pod is gone at once),
  no resourceVersion on lists and no watch resumption, no exec/attach/port-forward, no
  deletecollection, and a PATCH is a plain JSON merge whatever its content type.
- PodRunner: plays the scheduler and the kubelet of one node without NPUs. It polls the emulator for
  pods, refuses pods that request resources the node lacks (a FailedScheduling event, the pod stays
  Pending), runs every container's command as a local process with the pod's environment, and reports
  status.phase, podIP/hostIP and container statuses. A pod deleted from the API has its processes killed.
  An env secretKeyRef is read from the Secret in the API (a missing Secret or key is a runner error,
  where a kubelet would leave the container in CreateContainerConfigError).
  Volumes become local directories in a per-pod root: a ConfigMap volume gets the ConfigMap's items
  written as files, an emptyDir is an empty directory, and a PVC is a shared directory per claim
  (pvc_dir(claim)), so gather can read what the pods wrote to output/. Absolute mount paths in the
  command, the working directory and the environment are rewritten to those directories. Every pod
  has the address 127.0.0.1, so fieldRef status.podIP/hostIP and Service DNS names (*.svc) resolve to it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp.web
import kmock
import yaml
from kmock._internal import enums

NODE_RESOURCES = {"cpu", "memory", "ephemeral-storage"}  # what this node has: no huawei.com/Ascend910
_CORE = ("v1/pods", "v1/configmaps", "v1/services", "v1/secrets", "v1/events")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(obj: dict, dotted: str):
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _selected(obj: dict, params) -> bool:
    """labelSelector and fieldSelector, equality terms only (k=v,k2=v2)."""
    for param, lookup in (("labelSelector", lambda k: (obj.get("metadata", {}).get("labels") or {}).get(k)),
                          ("fieldSelector", lambda k: _get(obj, k))):
        for term in filter(None, params.get(param, "").split(",")):
            key, _, value = term.partition("=")
            if str(lookup(key.strip())) != value.strip().lstrip("="):
                return False
    return True


class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the additions listed in the module docstring."""

    pod_logs = None  # (namespace, pod, container) -> str | None, set by the pod runner
    refuse: dict[str, tuple[int, str, str]] = {}  # name suffix -> (status, reason, message) for its creation
    _versions = itertools.count(1)

    async def _handle(self, request):
        if request.resource is not None and request.action == enums.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            for suffix, (status, reason, message) in self.refuse.items():
                if meta.get("name", "").endswith(suffix):  # what admission or validation would refuse
                    raise kmock.KubernetesError(status=status, reason=reason, message=message.format(**meta))
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(next(self._versions)))
            if request.namespace:
                meta.setdefault("namespace", request.namespace)
        if (request.resource is not None and request.resource.plural == "pods" and request.subresource == "log"
                and request.method == enums.method.GET):
            container = request.params.get("container", "")
            text = self.pod_logs(request.namespace, request.name, container) if self.pod_logs else None
            if text is None:
                raise kmock.KubernetesError(status=400, reason="BadRequest",
                                            message=f'container "{container}" in pod "{request.name}" has no log')
            return aiohttp.web.Response(text=text, content_type="text/plain")
        return await super()._handle(request)

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        result["items"] = [o for o in result["items"] if _selected(o, request.params)]
        return result

    async def _serve_watch(self, request):
        loop = asyncio.get_running_loop()
        end = loop.time() + float(request.params.get("timeoutSeconds") or 3600)
        events = super()._serve_watch(request)
        try:
            while (left := end - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(anext(events), left)
                except (asyncio.TimeoutError, StopAsyncIteration):
                    break
                if not isinstance(event, dict) or _selected(event.get("object", {}), request.params):
                    yield event
        finally:
            await events.aclose()


class ApiServer:
    """The emulator on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self):
        self.emulator: ClusterEmulator | None = None
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the API emulator did not start")

    async def _serve(self):
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with ClusterEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.refuse = {}
            for resource in _CORE:
                emulator.resources[resource] = {}
            self.emulator, self.port = emulator, server.port
            self._ready.set()
            await self._stop.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@dataclass
class PodProcesses:
    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    done: bool = False
    started: str = field(default_factory=_now)
    finished: dict[str, str] = field(default_factory=dict)
    reported: dict | None = None


class PodRunner:
    """The kubelet test double (see the module docstring). Runs in a thread, polling every 0.2 s."""

    def __init__(self, api_url: str, root: Path, emulator: ClusterEmulator):
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = api_url
        self.core = client.CoreV1Api(client.ApiClient(configuration))
        self.root = root
        self.pods: dict[tuple[str, str], PodProcesses] = {}
        self.unschedulable: set[tuple[str, str]] = set()
        self.seen: dict[str, dict] = {}  # every pod as first seen, by name
        self.errors: list[str] = []
        emulator.pod_logs = self.log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def pvc_dir(self, claim: str) -> Path:
        path = self.root / "pvc" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, namespace: str, name: str, container: str) -> str | None:
        pod = self.pods.get((namespace, name))
        path = pod.logs.get(container) if pod else None
        return path.read_text(errors="replace") if path and path.is_file() else None

    def alive(self) -> list[int]:
        return [p.pid for pod in self.pods.values() for p in pod.procs.values() if p.poll() is None]

    def stop(self):
        self._stop.set()
        self._thread.join(10)
        for key in list(self.pods):
            self._kill(key)

    def _loop(self):
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - a test double reports, the test asserts
                self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def _tick(self):
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=10)
        current = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in json.loads(resp.data)["items"]}
        for key in [k for k in self.pods if k not in current]:
            self._kill(key)
        for key, pod in current.items():
            self.seen.setdefault(key[1], pod)
            if key in self.unschedulable:
                continue
            if key not in self.pods:
                self._start(key, pod)
            elif not self.pods[key].done:
                self._report(key, pod)

    def _start(self, key, pod):
        ns, name = key
        spec = pod["spec"]
        missing = sorted({r for c in spec["containers"] for r in (c.get("resources", {}).get("requests") or {})}
                         - NODE_RESOURCES)
        if missing:
            self.unschedulable.add(key)
            message = "0/1 nodes are available: " + ", ".join(f"1 Insufficient {r}" for r in missing) + "."
            self.core.create_namespaced_event(ns, {
                "metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}", "namespace": ns},
                "involvedObject": {"kind": "Pod", "name": name, "namespace": ns},
                "reason": "FailedScheduling", "message": message, "type": "Warning"})
            self._patch(ns, name, {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]})
            return
        root = self.root / "pods" / ns / name
        mounts = {}
        for volume in spec.get("volumes", []):
            local = root / "volumes" / volume["name"]
            if "configMap" in volume:
                data = self.core.read_namespaced_config_map(volume["configMap"]["name"], ns).data or {}
                for item in volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    (local / item["path"]).write_text(data[item["key"]])
            elif "persistentVolumeClaim" in volume:
                local = self.pvc_dir(volume["persistentVolumeClaim"]["claimName"])
            local.mkdir(parents=True, exist_ok=True)
            mounts[volume["name"]] = local
        state = PodProcesses(root)
        self.pods[key] = state
        for container in spec["containers"]:
            paths = {m["mountPath"]: mounts[m["name"]] for m in container.get("volumeMounts", [])
                     if m["mountPath"] != "/dev/shm"}
            for mount, local in sorted(paths.items()):  # a mount inside another one: a link in its parent
                parent = next((p for p in paths if mount.startswith(p + "/")), None)
                if parent:
                    link = paths[parent] / mount[len(parent) + 1:]
                    if not link.exists():
                        link.symlink_to(local, target_is_directory=True)

            def local_path(value: str) -> str:
                for mount in sorted(paths, key=len, reverse=True):
                    if value == mount or value.startswith(mount + "/"):
                        return str(paths[mount]) + value[len(mount):]
                return value

            env = dict(os.environ)
            env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    data = self.core.read_namespaced_secret(ref["name"], ns).data or {}
                    env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif "valueFrom" in var:
                    env[var["name"]] = "127.0.0.1"  # fieldRef status.podIP / status.hostIP
                elif var["value"].endswith(".svc"):
                    env[var["name"]] = "127.0.0.1"  # the Service's DNS name leads to a pod on this host
                else:
                    env[var["name"]] = local_path(var["value"])
            log = root / "logs" / f"{container['name']}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("wb") as out:
                state.procs[container["name"]] = subprocess.Popen(
                    [local_path(a) for a in container["command"] + container.get("args", [])],
                    cwd=local_path(container.get("workingDir", str(root))), env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            state.logs[container["name"]] = log
        self._report(key, pod)

    def _report(self, key, pod):
        state = self.pods[key]
        codes = {name: proc.poll() for name, proc in state.procs.items()}
        if codes == state.reported:
            return
        statuses = []
        for name, code in codes.items():
            if code is not None:
                state.finished.setdefault(name, _now())
            run = {"running": {"startedAt": state.started}} if code is None else {"terminated": {
                "exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": state.finished[name]}}
            statuses.append({"name": name, "ready": code is None, "restartCount": 0, "image": "local",
                             "imageID": "", "state": run})
        phase = "Running" if None in codes.values() else "Succeeded" if not any(codes.values()) else "Failed"
        self._patch(*key, {"phase": phase, "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": state.started,
                           "containerStatuses": statuses})
        state.reported, state.done = codes, phase != "Running"

    def _patch(self, ns, name, status):
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status}, _request_timeout=10)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    def _kill(self, key):
        state = self.pods.pop(key, None)
        if state is None:
            return
        for proc in state.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in state.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Cluster:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.api = ApiServer()
        self.runner = PodRunner(self.api.url, root, self.api.emulator)
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.api.url}}],
            "users": [{"name": "tester", "user": {}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        }))

    def objects(self, label_selector: str) -> list[str]:
        """Kind/name of every object in the API that matches the selector."""
        core = self.runner.core
        found = []
        for kind, fn in (("Pod", core.list_pod_for_all_namespaces), ("ConfigMap", core.list_config_map_for_all_namespaces),
                         ("Service", core.list_service_for_all_namespaces),
                         ("Secret", core.list_secret_for_all_namespaces)):
            found += [f"{kind}/{o.metadata.name}" for o in fn(label_selector=label_selector).items]
        return found

    def stored(self) -> list[tuple[str, dict]]:
        """(resource plural, object) for every version of every object the API has held, deleted ones
        included (kmock keeps their history). A version need not say its kind (a status patch does not)."""
        return [(key[0].plural, version.raw) for key, obj in list(self.api.emulator.objects.items())
                for version in obj.history if version is not None]

    def stop(self):
        self.runner.stop()
        self.api.stop()
