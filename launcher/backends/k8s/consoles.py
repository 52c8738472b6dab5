"""The ranks' consoles on Kubernetes, and the mirror directory the live view and the stall watchdog read.

A per-rank pod's log (the log subresource of its rank container) is its rank's console. While `up`
watches, each started pod's log comes through one follow stream, read in a thread of its own as it
grows: the log subresource has no byte offset (sinceTime counts whole seconds), so reading whole logs
on every poll would cost requests and bytes that grow with the run's length. A stream that breaks (a
dropped connection, FOLLOW_IDLE_S without a byte) is opened again and the bytes already mirrored are
skipped. A node's pod runs msrun, whose workers write their consoles to output/ on the claim: those,
and every rank's exit file, are read from the claim where it is mounted here (--pvc-dir).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from launcher.backends.k8s.api import RANK_CONTAINER, api_message, exit_code, phase
from launcher.backends.k8s.objects import RunPod
from launcher.errors import BackendError
from launcher.plan import STATUS_DIR, LaunchPlan

# A follow stream silent this long is opened again: a connection that died without a reset would
# otherwise leave the live view (and the stall watchdog, whose shortest budget is 120 s) without steps.
FOLLOW_IDLE_S = 60
# A stream that ends cleanly ends with its container; the pod's phase says so only later (a kubelet
# reports a second or more after). A pod still Running this long after its stream ended had its stream
# closed early (a proxy, an apiserver restart), and it is opened again.
REOPEN_AFTER_S = 15.0
RETRY_S = 1.0
STARTED = ("Running", "Succeeded", "Failed")


class Consoles:
    def __init__(self, core, ns: str, plan: LaunchPlan, run_pods: dict[str, RunPod], mirror_dir: Path,
                 claim_dir: Path | None, request_timeout: float):
        """claim_dir: the run's folder on the claim as mounted here (the pods' output/), if it is."""
        self.core, self.ns, self.plan, self.run_pods = core, ns, plan, run_pods
        self.mirror_dir, self.claim_dir, self.request_timeout = mirror_dir, claim_dir, request_timeout
        self.mirrored: dict[str, int] = {}  # bytes of each mirrored file written so far
        self.streams: dict[str, threading.Thread] = {}
        self.stream_ended: dict[str, float] = {}  # when each pod's last stream ended cleanly (monotonic)
        self.stream_error: BackendError | None = None
        self.closed = threading.Event()

    # --- reading once ------------------------------------------------------------------------------

    def log(self, name: str) -> str | None:
        """The pod's whole log (the rank's container), or None if the pod has none (not started, or gone)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            resp = self.core.read_namespaced_pod_log(name, self.ns, container=RANK_CONTAINER, _preload_content=False,
                                                     _request_timeout=self.request_timeout)
        except ApiException as exc:
            if exc.status == 403:  # not a pod without a log yet: the launcher may not read logs at all
                raise BackendError(f"log of pod {name}: {api_message(exc)}") from None
            return None
        except HTTPError as exc:
            raise BackendError(f"log of {name}: cannot reach the Kubernetes API: {exc}") from None
        return resp.data.decode(errors="replace")

    def console(self, pod: RunPod, rank: int) -> str | None:
        """The rank's console so far: its pod's log, or the file msrun's worker writes on the claim."""
        if pod.own_console:
            return self.log(pod.name)
        return self.read_claim(self.plan.ranks[rank].console_log)

    def on_claim(self, rel: str) -> Path | None:
        """Where a file the pods write under output/ is on this machine, if the claim is mounted here."""
        return self.claim_dir / rel.removeprefix("output/") if self.claim_dir is not None else None

    def read_claim(self, rel: str) -> str | None:
        path = self.on_claim(rel)
        return path.read_text(errors="replace") if path and path.is_file() else None

    def streamed_console(self, name: str, rank: int) -> Path | None:
        """A per-rank pod's whole log, when this process streamed it to its end (the container ended)."""
        path = self.mirror_dir / self.plan.ranks[rank].info_log
        return path if name in self.stream_ended and path.is_file() else None

    # --- the mirror --------------------------------------------------------------------------------

    def mirror(self, pods: dict, follow: bool = False) -> Path:
        """What is new in each started rank's console, and its exit code, into the mirror directory.
        follow: per-rank pods' logs through follow streams (while `up` watches); else read whole, once."""
        if self.stream_error is not None:
            raise self.stream_error
        for name, pod in pods.items():
            if phase(pod) not in STARTED:
                continue
            run_pod = self.run_pods[name]
            for rank in run_pod.ranks:
                slot = self.plan.ranks[rank]
                if run_pod.own_console and follow:
                    self.follow(name, slot.info_log, phase(pod))
                else:
                    text = self.log(name) if run_pod.own_console else self.read_claim(slot.info_log)
                    if text is not None:
                        self.write(slot.info_log, 0, text.encode())
                code = exit_code(pod) if run_pod.own_console else self.read_claim(f"{STATUS_DIR}/rank_{rank}.exit")
                if code is not None:
                    path = self.mirror_dir / STATUS_DIR / f"rank_{rank}.exit"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(f"{str(code).strip()}\n")
        return self.mirror_dir

    def write(self, rel: str, start: int, data: bytes) -> None:
        """Bytes start.. of a console into its mirror, skipping those already there."""
        path = self.mirror_dir / rel
        if rel not in self.mirrored:  # a mirror an earlier process (`up`, while `status` reads) began
            self.mirrored[rel] = path.stat().st_size if path.is_file() else 0
        have = self.mirrored[rel]
        if start + len(data) <= have:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data[max(0, have - start):])
        self.mirrored[rel] = start + len(data)

    def follow(self, name: str, rel: str, pod_phase: str | None) -> None:
        """Start the pod's follow stream: once, and again if the pod runs on long after it ended."""
        thread = self.streams.get(name)
        if thread is not None and (thread.is_alive() or pod_phase != "Running"
                                   or time.monotonic() - self.stream_ended.get(name, 0.0) < REOPEN_AFTER_S):
            return
        thread = threading.Thread(target=self._stream, args=(name, rel), name=f"log {name}", daemon=True)
        self.streams[name] = thread
        thread.start()

    def _stream(self, name: str, rel: str) -> None:
        """Read the pod's log as it grows until it ends (the container ended), the pod is gone, or close()."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        while not self.closed.is_set():
            try:
                resp = self.core.read_namespaced_pod_log(name, self.ns, container=RANK_CONTAINER, follow=True,
                                                         _preload_content=False,
                                                         _request_timeout=(self.request_timeout, FOLLOW_IDLE_S))
                try:
                    offset = 0
                    for chunk in resp.stream(64 * 1024, decode_content=False):
                        self.write(rel, offset, chunk)
                        offset += len(chunk)
                        if self.closed.is_set():
                            return
                finally:
                    resp.release_conn()
                self.stream_ended[name] = time.monotonic()
                return
            except ApiException as exc:
                if exc.status == 404:  # the pod is gone
                    return
                if exc.status == 403:
                    self.stream_error = BackendError(f"log of pod {name}: {api_message(exc)}")
                    return
            except (HTTPError, OSError):
                pass  # dropped or silent too long: open it again, skipping what is mirrored
            self.closed.wait(RETRY_S)

    def close(self, wait: float = 5.0) -> None:
        """Stop every stream; a stream of an ended container has ended already."""
        self.closed.set()
        deadline = time.monotonic() + wait
        for thread in self.streams.values():
            thread.join(max(0.0, deadline - time.monotonic()))
