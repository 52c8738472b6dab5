"""A test double for the kubelet: the one part of the Kubernetes tests that is not the real program,
because no container runtime can run here.

NodeAgent registers Node objects (Ready, with `allocatable` the scheduler fits against, including
huawei.com/Ascend910 as the Ascend device plugin advertises it), renews their Leases in kube-node-lease,
and runs the containers of the pods the real kube-scheduler bound to its nodes as local processes:
- in a scratch root per pod, with only the pod's own environment (plus PATH to this virtualenv's
  python and HOME in the pod's root), not the test's;
- volumes are local directories: a ConfigMap's or Secret's items written as files, an emptyDir or a
  projected service-account volume empty, a PVC one directory per claim (pvc_dir(), which also
  creates the PersistentVolume and the claim bound to it), with a mount's subPath or subPathExpr
  (its $(VAR) from the container's environment) made as the kubelet makes it;
- absolute mount paths in the command, working directory and environment are rewritten to those
  directories (the processes share this machine's filesystem);
- each pod has its own address on this host's loopback, 127.1.x.y (the loopback takes all of
  127.0.0.0/8), as status.podIP and its fieldRef, and an `ip` first on its PATH whose `ip -j addr`
  shows that address, as in the pod's own network namespace (msrun starts a scheduler on the node
  whose address is --master_addr: mindspore/parallel/cluster/process_entity/_api.py, _is_local_ip);
  status.hostIP is 127.0.0.1;
- an env value that is a Service's `<name>.<namespace>.svc` becomes the address of the pod the
  Service selects, once there is one (the container waits until then, as a DNS lookup would): the
  one name rewrite, for there is no cluster DNS.
It writes pod status through the /status subresource, and on deletion (a deletionTimestamp) sends
SIGTERM, waits up to the pod's grace period, sends SIGKILL, reports the final status and then deletes
the pod with a zero grace period, as the kubelet does. Container logs are served over HTTPS at the
nodes' kubelet port (`/containerLogs/<ns>/<pod>/<container>`, follow, tailLines, limitBytes) with a
certificate from the test's CA, so `pods/log` goes through the real apiserver, which checks it.
What it does not do: images, probes, restarts (restartPolicy is taken as Never), resource limits,
exec/attach/port-forward, and it signs in as a cluster admin rather than as system:node:<name>.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

NODE_ALLOCATABLE = {"cpu": "192", "memory": "1536Gi", "pods": "110", "ephemeral-storage": "1Ti"}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class PodProcesses:
    root: Path
    uid: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    started: str = field(default_factory=now)
    finished: dict[str, str] = field(default_factory=dict)
    reported: dict | None = None
    terminating: bool = False


class _NotYet(Exception):
    """A Service the pod names selects no pod yet."""


class NodeAgent:
    """See the module docstring. Polls the API every 0.2 s in a thread."""

    def __init__(self, plane, root: Path, nodes: list[str], npus: int = 8):
        from kubernetes import client

        self.plane, self.root, self.nodes = plane, root, nodes
        api = plane.client("node-agent")
        self.core = client.CoreV1Api(api)
        self.coordination = client.CoordinationV1Api(api)
        self.pods: dict[tuple[str, str], PodProcesses] = {}
        self.seen: dict[str, dict] = {}  # every pod as first seen, by name
        self.addresses: dict[str, str] = {}  # pod uid -> its own loopback address
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._terminating: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._server = self._serve_logs()
        self._register(npus)
        self._threads = [threading.Thread(target=self._loop, daemon=True),
                         threading.Thread(target=self._renew_leases, daemon=True)]
        for thread in self._threads:
            thread.start()
        self._wait_schedulable()

    # --- nodes -------------------------------------------------------------------------------

    def _register(self, npus: int):
        """Create the nodes, or take over the ones an earlier agent left (the node lifecycle controller
        takes seconds to lift a new node's not-ready taint), and remove other nodes."""
        from kubernetes.client.exceptions import ApiException

        port = self._server.server_address[1]
        for node in self.core.list_node().items:
            if node.metadata.name not in self.nodes:
                self.core.delete_node(node.metadata.name)
        for name in self.nodes:
            allocatable = {**NODE_ALLOCATABLE, **({"huawei.com/Ascend910": str(npus)} if npus else {})}
            status = {"capacity": allocatable, "allocatable": allocatable,
                      "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                      "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
                      "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                      "message": "node agent is posting ready status",
                                      "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}
            # An NPU server carries the accelerator-type label Ascend pods select (MindCluster's node labels).
            labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                      "accelerator-type": "module-910b-8" if npus else None}
            try:
                self.core.create_node({"metadata": {"name": name, "labels": {k: v for k, v in labels.items() if v}},
                                       "status": status})
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(name, {"metadata": {"labels": labels}})
                # A strategic merge: None removes an earlier agent's NPUs; Ready replaces the Unknown the
                # node lifecycle controller set while no agent renewed the Lease (it then lifts its taint).
                sized = {**allocatable, "huawei.com/Ascend910": allocatable.get("huawei.com/Ascend910")}
                self.core.patch_node_status(name, {"status": {**status, "capacity": sized, "allocatable": sized}})

    def add_node(self, name: str, npus: int = 8) -> None:
        """One more node, registered (or taken over) and schedulable when this returns."""
        self.nodes = [*self.nodes, name]
        self._register(npus)
        self._wait_schedulable()

    def _renew_leases(self):
        from kubernetes.client.exceptions import ApiException

        while not self._stop.is_set():
            for name in self.nodes:
                body = {"metadata": {"name": name}, "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                                                             "renewTime": _micro_now()}}
                try:
                    try:
                        self.coordination.replace_namespaced_lease(name, "kube-node-lease", {
                            **body, "metadata": {"name": name, "resourceVersion": self.coordination.read_namespaced_lease(
                                name, "kube-node-lease").metadata.resource_version}})
                    except ApiException as exc:
                        if exc.status != 404:
                            raise
                        self.coordination.create_namespaced_lease("kube-node-lease", body)
                except Exception as exc:  # noqa: BLE001 - a test double reports, the test asserts
                    self.errors.append(f"lease {name}: {exc!r}")
            self._stop.wait(10)

    def _wait_schedulable(self):
        """The node lifecycle controller lifts the not-ready taint once it sees the node Ready."""
        deadline = time.monotonic() + 60
        while any(self.core.read_node(name).spec.taints for name in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes still tainted after 60s: {[self.core.read_node(n).spec.taints for n in self.nodes]}")
            time.sleep(0.3)

    # --- pods --------------------------------------------------------------------------------

    def alive(self) -> list[int]:
        with self._lock:
            return [p.pid for pod in self.pods.values() for p in pod.procs.values() if p.poll() is None]

    def _loop(self):
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001
                if not self._stop.is_set():
                    self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def _tick(self):
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=10)
        current = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in json.loads(resp.data)["items"]
                   if p["spec"].get("nodeName") in self.nodes}
        for key in [k for k in self.pods if k not in current or current[k]["metadata"]["uid"] != self.pods[k].uid]:
            self._kill(key, 0)
        for key, pod in current.items():
            self.seen.setdefault(key[1], pod)
            if pod["metadata"].get("deletionTimestamp"):
                self._terminate(key, pod)
            elif key not in self.pods:
                self._start(key, pod)
            else:
                self._report(key, pod)

    def _terminate(self, key, pod):
        """Stop the containers within the grace period, report, then remove the pod from the API."""
        state = self.pods.get(key)
        if key in self._terminating:
            return
        self._terminating.add(key)
        if state is not None:
            state.terminating = True

        def finish():
            from kubernetes.client.exceptions import ApiException

            try:
                if state is not None:
                    self._kill(key, int(pod["metadata"].get("deletionGracePeriodSeconds") or 0), keep=True)
                    self._report(key, pod, final=True)
                    with self._lock:
                        self.pods.pop(key, None)
                # The options in the body: with a body, the apiserver does not read them from the query.
                self.core.delete_namespaced_pod(key[1], key[0], body={
                    "gracePeriodSeconds": 0, "preconditions": {"uid": pod["metadata"]["uid"]}})
            except ApiException as exc:
                if exc.status != 404:  # gone already
                    self.errors.append(f"delete {key}: {exc.status} {exc.body}")
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"terminate {key}: {exc!r}")
            finally:
                self._terminating.discard(key)

        threading.Thread(target=finish, daemon=True).start()

    def _volumes(self, ns: str, spec: dict, root: Path) -> dict[str, Path]:
        mounts = {}
        for volume in spec.get("volumes", []):
            local = root / "volumes" / volume["name"]
            items = None
            if "configMap" in volume:
                data = self.core.read_namespaced_config_map(volume["configMap"]["name"], ns).data or {}
                items = (volume["configMap"].get("items") or [{"key": k, "path": k} for k in data], data, False)
            elif "secret" in volume:
                data = self.core.read_namespaced_secret(volume["secret"]["secretName"], ns).data or {}
                items = (volume["secret"].get("items") or [{"key": k, "path": k} for k in data], data, True)
            elif "persistentVolumeClaim" in volume:
                local = self.pvc_dir(volume["persistentVolumeClaim"]["claimName"], ns)
            if items:
                wanted, data, encoded = items
                for item in wanted:
                    (local / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                    value = data[item["key"]]
                    (local / item["path"]).write_bytes(base64.b64decode(value) if encoded else value.encode())
            local.mkdir(parents=True, exist_ok=True)
            mounts[volume["name"]] = local
        return mounts

    def pod_ip(self, pod: dict) -> str:
        n = len(self.addresses)
        return self.addresses.setdefault(pod["metadata"]["uid"], f"127.1.{n // 250}.{n % 250 + 1}")

    def _service_ip(self, host: str) -> str:
        """The address of the pod behind a Service's DNS name; _NotYet while it selects none."""
        from kubernetes.client.exceptions import ApiException

        name, ns = host.split(".")[:2]
        try:
            selector = self.core.read_namespaced_service(name, ns).spec.selector or {}
        except ApiException as exc:
            if exc.status == 404:
                raise _NotYet(host) from None
            raise
        resp = self.core.list_namespaced_pod(ns, label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
                                             _preload_content=False)
        pods = [p for p in json.loads(resp.data)["items"] if p["spec"].get("nodeName") in self.nodes]
        if not pods:
            raise _NotYet(host)
        return self.pod_ip(pods[0])

    def _ip_command(self, pod_root: Path, address: str) -> Path:
        """bin/ip for the pod: `ip -j addr` shows its loopback and its own address; anything else is the real ip."""
        bin_dir = pod_root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        shown = json.dumps([{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
                            {"ifname": "eth0", "addr_info": [{"family": "inet", "local": address, "prefixlen": 32}]}])
        (bin_dir / "ip").write_text(f"#!/bin/sh\nif [ \"$*\" = \"-j addr\" ]; then echo '{shown}'; exit 0; fi\n"
                                    f"exec {shutil.which('ip') or '/usr/sbin/ip'} \"$@\"\n")
        (bin_dir / "ip").chmod(0o755)
        return bin_dir

    def _env(self, ns: str, pod: dict, container: dict, local_path) -> dict[str, str]:
        pod_root = self.root / "pods" / ns / pod["metadata"]["name"]
        own_bin = self._ip_command(pod_root, self.pod_ip(pod))
        env = {"PATH": os.pathsep.join([str(own_bin), str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin",
                                        "/bin"]),
               "HOME": str(pod_root / "home")}
        Path(env["HOME"]).mkdir(parents=True, exist_ok=True)
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self.core.read_namespaced_secret(ref["name"], ns).data or {}
                env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[var["name"]] = (self.core.read_namespaced_config_map(ref["name"], ns).data or {})[ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                if path == "status.podIP":
                    env[var["name"]] = self.pod_ip(pod)
                elif path == "status.hostIP":
                    env[var["name"]] = "127.0.0.1"
                elif path.startswith("metadata.labels['"):
                    env[var["name"]] = pod["metadata"].get("labels", {}).get(path[17:-2], "")
                else:
                    env[var["name"]] = str(pod["metadata"].get(path.removeprefix("metadata."), ""))
            elif var.get("value", "").endswith(".svc"):
                env[var["name"]] = self._service_ip(var["value"])
            else:
                env[var["name"]] = local_path(var.get("value", ""))
        return env

    def _start(self, key, pod):
        ns, name = key
        spec = pod["spec"]
        root = self.root / "pods" / ns / name
        try:
            for container in spec["containers"]:
                self._env(ns, pod, container, str)
        except _NotYet:
            return  # a Service it names selects no pod yet: the next tick tries again
        try:
            mounts = self._volumes(ns, spec, root)
        except Exception as exc:  # noqa: BLE001 - where a kubelet would leave the pod ContainerCreating
            self.errors.append(f"volumes of {name}: {exc!r}")
            return
        state = PodProcesses(root, pod["metadata"]["uid"])
        with self._lock:
            self.pods[key] = state
        for container in spec["containers"]:
            try:
                plain_env = self._env(ns, pod, container, str)
            except Exception as exc:  # noqa: BLE001 - a kubelet: CreateContainerConfigError
                self.errors.append(f"environment of {name}/{container['name']}: {exc!r}")
                continue
            paths = {}
            for m in container.get("volumeMounts", []):
                if m["mountPath"] == "/dev/shm":
                    continue
                sub = m.get("subPath") or re.sub(r"\$\((\w+)\)", lambda v: plain_env.get(v[1], ""), m.get("subPathExpr", ""))
                local = mounts[m["name"]] / sub if sub else mounts[m["name"]]
                local.mkdir(parents=True, exist_ok=True)
                paths[m["mountPath"]] = local
            for mount, local in sorted(paths.items()):  # a mount inside another one: a link in its parent
                parent = next((p for p in paths if mount.startswith(p + "/")), None)
                if parent:
                    link = paths[parent] / mount[len(parent) + 1:]
                    if not link.exists():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(local, target_is_directory=True)

            def local_path(value: str, paths=paths) -> str:
                for mount in sorted(paths, key=len, reverse=True):
                    if value == mount or value.startswith(mount + "/"):
                        return str(paths[mount]) + value[len(mount):]
                return value

            log = root / "logs" / f"{container['name']}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = self._env(ns, pod, container, local_path)
            with log.open("wb") as out:
                state.procs[container["name"]] = subprocess.Popen(
                    [local_path(a) for a in container.get("command", []) + container.get("args", [])],
                    cwd=local_path(container.get("workingDir", str(root))), env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            state.logs[container["name"]] = log
        self._report(key, pod)

    def _report(self, key, pod, final: bool = False):
        state = self.pods.get(key)
        if state is None:
            return
        codes = {name: proc.poll() for name, proc in state.procs.items()}
        if codes == state.reported or (state.terminating and not final):
            return
        images = {c["name"]: c.get("image", "") for c in pod["spec"]["containers"]}
        statuses = []
        for name, code in codes.items():
            if code is not None:
                state.finished.setdefault(name, now())
            run = {"running": {"startedAt": state.started}} if code is None else {"terminated": {
                "exitCode": code if code >= 0 else 128 - code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": state.started, "finishedAt": state.finished[name]}}
            statuses.append({"name": name, "ready": code is None, "restartCount": 0, "image": images[name],
                             "imageID": "", "started": code is None, "state": run})
        phase = "Running" if None in codes.values() else "Succeeded" if not any(codes.values()) else "Failed"
        address = self.pod_ip(pod)
        self._patch(*key, {"phase": phase, "podIP": address, "podIPs": [{"ip": address}],
                           "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "startTime": state.started,
                           "containerStatuses": statuses})
        state.reported = codes

    def _patch(self, ns, name, status):
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.patch_namespaced_pod_status(name, ns, {"status": status}, _request_timeout=10)
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                self.errors.append(f"status of {name}: {exc.status} {exc.body}")

    def _kill(self, key, grace: int, keep: bool = False):
        state = self.pods.get(key) if keep else self.pods.pop(key, None)
        if state is None:
            return
        for proc in state.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + max(grace, 1)
        for proc in state.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # --- claims ------------------------------------------------------------------------------

    def pvc_dir(self, claim: str, ns: str = "default") -> Path:
        """The claim's directory here; the first call makes a PersistentVolume and the claim bound to it."""
        from kubernetes.client.exceptions import ApiException

        path = self.root / "pvc" / claim
        if not path.is_dir():
            path.mkdir(parents=True)
            volume = f"{ns}-{claim}"
            try:
                self.core.create_persistent_volume({
                    "metadata": {"name": volume}, "spec": {
                        "capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                        "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(path)},
                        "claimRef": {"namespace": ns, "name": claim}}})
                self.core.create_namespaced_persistent_volume_claim(ns, {
                    "metadata": {"name": claim}, "spec": {
                        "accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                        "resources": {"requests": {"storage": "100Gi"}}}})
            except ApiException as exc:
                if exc.status != 409:
                    raise
            deadline = time.monotonic() + 60  # kube-controller-manager's volume binder binds the two
            while self.core.read_namespaced_persistent_volume_claim(claim, ns).status.phase != "Bound":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"claim {claim} not bound within 60s")
                time.sleep(0.2)
        return path

    # --- logs over HTTPS ---------------------------------------------------------------------

    def log_path(self, ns: str, name: str, container: str) -> tuple[Path, subprocess.Popen] | None:
        with self._lock:
            state = self.pods.get((ns, name))
        if state is None or container not in state.logs:
            return None
        return state.logs[container], state.procs[container]

    def _serve_logs(self) -> http.server.ThreadingHTTPServer:
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                found = agent.log_path(*parts[1:4]) if len(parts) == 4 and parts[0] == "containerLogs" else None
                if found is None:
                    self.send_error(404, "no such container")
                    return
                query = dict(urllib.parse.parse_qsl(url.query))
                path, proc = found
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                data = path.read_bytes()
                if "tailLines" in query:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) else b""
                limit = int(query.get("limitBytes", 0)) or None
                self.wfile.write(data[:limit])
                sent = path.stat().st_size
                while query.get("follow") == "true" and not agent._stop.is_set():
                    ended = proc.poll() is not None
                    with path.open("rb") as f:
                        f.seek(sent)
                        more = f.read()
                    if more:
                        self.wfile.write(more)
                        self.wfile.flush()
                        sent += len(more)
                    if ended:
                        break
                    time.sleep(0.2)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        cert, key = self.plane.pki.serving("node-agent", ["127.0.0.1", *self.nodes])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    # --- the end -----------------------------------------------------------------------------

    def stop(self):
        """Kill every process. The nodes stay registered for the next agent (see _register)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        for key in list(self.pods):
            self._kill(key, 0)
        self._server.shutdown()
