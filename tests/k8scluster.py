"""A Kubernetes cluster for the Kubernetes tests: the real control plane (k8s_control_plane.py: etcd,
kube-apiserver, kube-controller-manager, kube-scheduler), shared by the whole session, and two nodes
played by a test double for the kubelet (k8s_node_agent.py), fresh for each Cluster.

Cluster.stop() kills every process the node agent started and deletes what the test left in the
default namespace, so the next test meets an empty cluster; the nodes stay for the next Cluster.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import yaml

from kubernetes.client import CustomObjectsApi, RbacAuthorizationV1Api
from kubernetes.client.exceptions import ApiException

import k8s_control_plane
from k8s_node_agent import NodeAgent

# What a test must not leave to the next one (kind, client method suffix); the ones the API makes itself stay.
_CLEANED = (("pod", ()), ("config_map", ("kube-root-ca.crt",)), ("secret", ()), ("service", ("kubernetes",)),
            ("persistent_volume_claim", ()), ("resource_quota", ()), ("service_account", ("default",)))
_VOLCANO = (("batch.volcano.sh", "v1alpha1", "jobs"), ("scheduling.volcano.sh", "v1beta1", "podgroups"), ("mindxdl.gitee.com", "v1", "ascendjobs"))


class Cluster:
    def __init__(self, root: Path, nodes: int = 2, npus: int = 8, volcano: bool = False):
        root.mkdir(parents=True, exist_ok=True)
        self.plane = k8s_control_plane.shared()
        if volcano:
            self.plane.start_volcano()
        self._audit_start = self.plane.audit_log.stat().st_size if self.plane.audit_log.exists() else 0
        self.runner = NodeAgent(self.plane, root, [f"node-{i}" for i in range(1, nodes + 1)], npus)
        self.kubeconfig = self.plane.kubeconfig("admin")

    def objects(self, label_selector: str) -> list[str]:
        """Kind/name of every object in the API that matches the selector."""
        core = self.runner.core
        found = []
        for kind, fn in (("Pod", core.list_pod_for_all_namespaces), ("ConfigMap", core.list_config_map_for_all_namespaces),
                         ("Service", core.list_service_for_all_namespaces),
                         ("Secret", core.list_secret_for_all_namespaces)):
            found += [f"{kind}/{o.metadata.name}" for o in fn(label_selector=label_selector).items
                      if not (kind == "ConfigMap" and o.metadata.name == "kube-root-ca.crt")
                      and not (kind == "Service" and o.metadata.name == "kubernetes")]
        return found

    def stored(self) -> list[tuple[str, dict]]:
        """(resource plural, object) for every object the API returned from a write since this cluster
        was made, deleted ones included: the apiserver's own audit log."""
        return self.plane.stored(since=self._audit_start)

    def log_requests(self, pod: str, user: str = "admin") -> list[str]:
        """The request URI of every read of a pod's log by user since this cluster was made (audit log)."""
        return [e["requestURI"] for e in self.plane.audit_events(self._audit_start) if e["stage"] == "ResponseComplete" and e["user"]["username"] == user
                and (e.get("objectRef") or {}).get("subresource") == "log"
                and (e.get("objectRef") or {}).get("name") == pod]

    def stop(self):
        self.runner.stop()
        core = self.runner.core
        for kind, keep in _CLEANED:
            for obj in getattr(core, f"list_namespaced_{kind}")("default").items:
                if obj.metadata.name not in keep:
                    try:
                        getattr(core, f"delete_namespaced_{kind}")(obj.metadata.name, "default", grace_period_seconds=0)
                    except Exception:  # noqa: BLE001 - gone meanwhile
                        pass
        rbac = RbacAuthorizationV1Api(self.plane.client())
        for kind in ("role", "role_binding"):
            for obj in getattr(rbac, f"list_namespaced_{kind}")("default").items:
                getattr(rbac, f"delete_namespaced_{kind}")(obj.metadata.name, "default")
        custom = CustomObjectsApi(self.plane.client())
        for group, version, plural in _VOLCANO:
            try:
                for obj in custom.list_namespaced_custom_object(group, version, "default", plural)["items"]:
                    custom.delete_namespaced_custom_object(group, version, "default", plural, obj["metadata"]["name"])
            except ApiException as exc:
                if exc.status != 404:  # 404: Volcano is not installed
                    raise
        for volume in core.list_persistent_volume().items:
            core.delete_persistent_volume(volume.metadata.name)
        # Claims and volumes go once the controller manager's protection controllers drop their
        # finalizers; the next test makes a claim of the same name.
        deadline = time.monotonic() + 60
        while core.list_namespaced_persistent_volume_claim("default").items or core.list_persistent_volume().items:
            if time.monotonic() > deadline:
                raise RuntimeError("the test's claims or volumes were not deleted within 60s")
            time.sleep(0.2)


class CuttableLink:
    """A TCP relay between the launcher and the apiserver that a test can cut: cut() closes every
    connection through it and closes new ones at once (the client sees a reset, as when a load
    balancer or the network drops), until mend(). kubeconfig() leads a client through it; the
    apiserver's certificate names 127.0.0.1, so TLS checks pass through the relay unchanged."""

    def __init__(self, plane):
        self.plane = plane
        self.target = ("127.0.0.1", plane.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self.sockets: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def kubeconfig(self) -> Path:
        path = self.plane.kubeconfig("admin", name="admin-through-link")
        config = yaml.safe_load(path.read_text())
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(config))
        return path

    def cut(self) -> None:
        with self.lock:
            self.open = False
            for sock in self.sockets:
                _close(sock)
            self.sockets.clear()

    def mend(self) -> None:
        with self.lock:
            self.open = True

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            with self.lock:
                if not self.open:
                    _close(client)
                    continue
                server = socket.create_connection(self.target)
                self.sockets |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
