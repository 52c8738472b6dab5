"""A real Kubernetes control plane as local processes on 127.0.0.1, for the Kubernetes tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the upstream programs, built from
the Go module proxy by scripts/k8s-binaries. The apiserver's flags follow controller-runtime's envtest
(kubernetes-sigs/controller-runtime pkg/internal/testing/controlplane/apiserver.go, defaultArgs) with
token authentication instead of client certificates, RBAC (and the Node authorizer) on, and the
admission plugins a cluster has by default. The components sign in as the users their bootstrap RBAC
roles are bound to (system:kube-controller-manager, system:kube-scheduler; kubernetes/kubernetes
plugin/pkg/auth/authorizer/rbac/bootstrappolicy). Every request is written to an audit log, so a test can
read every object the API has held (stored()).

The kubelet is the one part that cannot run here (no container runtime): k8s_node_agent.py stands in.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120  # seconds for /readyz on 2 busy cores


def binaries() -> Path:
    """The directory scripts/k8s-binaries built (it builds nothing when the cache has them), or
    $LAUNCHER_K8S_BIN to run other builds."""
    if os.environ.get("LAUNCHER_K8S_BIN"):
        return Path(os.environ["LAUNCHER_K8S_BIN"])
    out = subprocess.run([ROOT / "scripts" / "k8s-binaries"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/k8s-binaries failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Pki:
    """A CA made for the test, and the certificates the apiserver and the node agent serve with."""

    def __init__(self, directory: Path):
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "launcher-test-ca")])
        self._ca = self._sign(name, self._ca_key.public_key(), name, ca=True)
        self.ca = self._write("ca.crt", self._ca.public_bytes(serialization.Encoding.PEM))
        # The service-account token signer: one key for both apiserver flags and the controller manager.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = self._write("sa.key", _pem_key(sa_key))
        self.sa_pub = self._write("sa.pub", sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def serving(self, name: str, hosts: list[str]) -> tuple[Path, Path]:
        """A serving certificate for hosts (names or IP addresses), signed by the CA: (cert, key)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.IPAddress(ipaddress.ip_address(h)) if h.replace(".", "").isdigit() else x509.DNSName(h)
                for h in hosts]
        cert = self._sign(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(),
                          self._ca.subject, sans=sans)
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", _pem_key(key)))

    def _sign(self, subject, public_key, issuer, ca=False, sans=()):
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(self._ca_key, hashes.SHA256())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager and kube-scheduler, started in that order."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="launcher-k8s-"))
        self.bin = binaries()
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.pki = Pki(self.root / "pki")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.tokens = {user: secrets.token_hex(16) for user in
                       ("admin", "node-agent", "volcano", "system:kube-controller-manager", "system:kube-scheduler")}
        # The node agent and Volcano sign in as themselves, for the audit log, but with every right:
        # Volcano's chart would bind its own ClusterRoles, and a real kubelet is system:node:<name>.
        groups = {"admin": "system:masters", "node-agent": "system:masters", "volcano": "system:masters"}
        (self.root / "tokens.csv").write_text("".join(
            f'{token},{user},{user},"{groups.get(user, "")}"\n' for user, token in self.tokens.items()))
        (self.root / "audit-policy.yaml").write_text(yaml.safe_dump({
            "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
            # Reads only by their metadata: the node agent lists every pod five times a second.
            "rules": [{"level": "Metadata", "verbs": ["get", "list", "watch"]}, {"level": "RequestResponse"}]}))
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._spawn("etcd", "--data-dir", self.root / "etcd", "--listen-client-urls", etcd_url,
                    "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync", "--log-level", "warn")
        cert, key = self.pki.serving("apiserver", ["127.0.0.1", "localhost", "kubernetes.default.svc", "10.0.0.1"])
        self._spawn(
            "kube-apiserver", f"--etcd-servers={etcd_url}", f"--secure-port={self.port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--cert-dir={self.root / 'certs'}",
            f"--tls-cert-file={cert}", f"--tls-private-key-file={key}", f"--client-ca-file={self.pki.ca}",
            f"--token-auth-file={self.root / 'tokens.csv'}", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            f"--service-account-issuer={self.url}", f"--service-account-key-file={self.pki.sa_pub}",
            f"--service-account-signing-key-file={self.pki.sa_key}", "--service-cluster-ip-range=10.0.0.0/24",
            # No Endpoints for the kubernetes Service: a loopback address is not a valid endpoint (kwok does the same).
            "--endpoint-reconciler-type=none",
            f"--kubelet-certificate-authority={self.pki.ca}", "--kubelet-preferred-address-types=InternalIP",
            f"--audit-policy-file={self.root / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=100000")
        self._wait_ready(self.url, "kube-apiserver")
        kcm_port, scheduler_port = free_port(), free_port()
        kcm = self.kubeconfig("system:kube-controller-manager")
        self._spawn("kube-controller-manager", f"--kubeconfig={kcm}", f"--authentication-kubeconfig={kcm}",
                    f"--authorization-kubeconfig={kcm}", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
                    "--leader-elect=false", "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={self.pki.sa_key}", f"--root-ca-file={self.pki.ca}",
                    "--node-monitor-grace-period=40s", "--concurrent-gc-syncs=5")
        scheduler = self.kubeconfig("system:kube-scheduler")
        self._spawn("kube-scheduler", f"--kubeconfig={scheduler}", f"--authentication-kubeconfig={scheduler}",
                    f"--authorization-kubeconfig={scheduler}", "--bind-address=127.0.0.1",
                    f"--secure-port={scheduler_port}", "--leader-elect=false")
        self._wait_ready(f"https://127.0.0.1:{kcm_port}", "kube-controller-manager", path="/healthz", verify=False)
        self._wait_ready(f"https://127.0.0.1:{scheduler_port}", "kube-scheduler", path="/healthz", verify=False)
        self._wait_for_default_service_account()

    def start_volcano(self) -> None:
        """Volcano's CRDs (as its chart installs them), vc-scheduler and vc-controller-manager, once.
        The scheduler makes the `default` queue itself (volcano pkg/scheduler/cache newDefaultAndRootQueue).
        No admission webhook: the launcher sets what its mutating webhook would default."""
        if any(name == "vc-scheduler" for name, _ in self.procs):
            return
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        extensions = client.ApiextensionsV1Api(self.client())
        names = []
        for path in sorted((self.bin / "volcano-crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            crd.pop("status", None)
            try:
                extensions.create_custom_resource_definition(crd)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            names.append(crd["metadata"]["name"])
        deadline = time.monotonic() + START_TIMEOUT
        for name in names:
            while not any(c.type == "Established" and c.status == "True"
                          for c in extensions.read_custom_resource_definition(name).status.conditions or []):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CRD {name} not established within {START_TIMEOUT}s")
                time.sleep(0.3)
        volcano = self.kubeconfig("volcano")
        self._spawn("vc-scheduler", f"--kubeconfig={volcano}", "--leader-elect=false", "--schedule-period=200ms")
        # Its default set less the JobFlow and JobTemplate controllers, whose CRDs the chart installs apart
        # (config/crd/jobflow): without them their informers never sync and no Job is handled
        # (volcano v1.14.1 cmd/controller-manager/app/options/options.go, defaultControllers).
        self._spawn("vc-controller-manager", f"--kubeconfig={volcano}", "--leader-elect=false",
                    "--controllers=*,-sharding-controller,-jobflow-controller,-jobtemplate-controller")
        custom = client.CustomObjectsApi(self.client())
        while True:
            try:
                custom.get_cluster_custom_object("scheduling.volcano.sh", "v1beta1", "queues", "default")
                return
            except ApiException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Volcano made no default queue within {START_TIMEOUT}s\n{self.logs()}") from None
                time.sleep(0.5)

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    def kubeconfig(self, user: str = "admin", token: str | None = None, namespace: str | None = None,
                   name: str | None = None) -> Path:
        path = self.root / "kubeconfigs" / f"{name or user.replace(':', '-')}.yaml"
        path.parent.mkdir(exist_ok=True)
        context = {"cluster": "test", "user": user, **({"namespace": namespace} if namespace else {})}
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca)}}],
            "users": [{"name": user, "user": {"token": token or self.tokens[user]}}],
            "contexts": [{"name": "test", "context": context}]}))
        return path

    def client(self, user: str = "admin"):
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig(user)))

    def audit_events(self, since: int = 0) -> list[dict]:
        """Every event of the apiserver's audit log from byte offset since on."""
        with self.audit_log.open("rb") as f:
            f.seek(since)
            return [json.loads(line) for line in f.read().decode().splitlines()]

    def stored(self, since: int = 0) -> list[tuple[str, dict]]:
        """(resource, object) for every object a create, update or patch returned, from the audit log
        (from byte offset since on)."""
        found = []
        for event in self.audit_events(since):
            obj, ref = event.get("responseObject"), event.get("objectRef") or {}
            if (event.get("verb") in ("create", "update", "patch") and isinstance(obj, dict) and "metadata" in obj
                    and event.get("stage") == "ResponseComplete"):
                found.append((ref.get("resource"), obj))
        return found

    def requests(self, since: int = 0, user: str = "admin") -> list[tuple[str, str]]:
        """(verb, resource) of every request user made, from the audit log (from byte offset since on)."""
        return [(e["verb"], (e.get("objectRef") or {}).get("resource", e.get("requestURI", "")))
                for e in self.audit_events(since) if e.get("stage") == "ResponseComplete" and e["user"]["username"] == user]

    def logs(self) -> str:
        """The tail of each component's log, for a failure message."""
        return "\n".join(f"--- {name}\n" + (self.root / "logs" / f"{name}.log").read_text()[-2000:]
                         for name, _ in self.procs)

    def stop(self):
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, *args):
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen([self.bin / name, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={"PATH": os.environ.get("PATH", "")},
                                    preexec_fn=_die_with_parent)
        self.procs.append((name, proc))

    def _wait_ready(self, url: str, name: str, path: str = "/readyz", verify: bool = True):
        context = ssl.create_default_context(cafile=str(self.pki.ca)) if verify else ssl._create_unverified_context()
        request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {self.tokens['admin']}"})
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            proc = dict(self.procs)[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not ready within {START_TIMEOUT}s\n{self.logs()}")
            time.sleep(0.5)

    def _wait_for_default_service_account(self):
        """The ServiceAccount admission plugin refuses pods until the controller made `default`."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.client())
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                core.read_namespaced_service_account("default", "default")
                return
            except ApiException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no default ServiceAccount within {START_TIMEOUT}s\n{self.logs()}") from None
                time.sleep(0.5)


_shared: ControlPlane | None = None


def shared() -> ControlPlane:
    """One control plane for the whole test session (it takes seconds to start); stopped at exit."""
    global _shared
    if _shared is None:
        _shared = ControlPlane()
        atexit.register(_shared.stop)
    return _shared
