"""The Kubernetes backend: create the plan's objects with the official client, watch the pods, gather, delete.

Objects are created in dependency order (the ConfigMap that owns the rest first, the pods, or the
Volcano Job or AscendJob whose controller makes them, last), with names `<job>-<short run id>` and
the label `launcher/run-id=<run id>` (objects.py), which a job's pod templates carry too. The run's
pods are watched from one resourceVersion to the next, so no change is missed (podwatch.py). A per-rank
pod's log (the log subresource) is its rank's console, and a node's pod's ranks write theirs to output/
(consoles.py): they feed the live view, the stall watchdog and ranks/rank_N/console.log. The files
under output/ are gathered from the run's folder runs/<run id>/ on the job's output PVC, mounted on
this machine (--pvc-dir). Gathering through exec + tar (pods without a PVC) is not implemented: their
checkpoints cannot be gathered. Deletion is explicit, object by object, by label, the job first so that
its controller makes no new pods: it does not rely on the garbage collector following the ownerReferences.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from launcher import gather, secret_env
from launcher.backends.base import teardown_shield
from launcher.backends.k8s.api import Target, api_client, api_message, finished_at, phase
from launcher.backends.k8s.consoles import Consoles
from launcher.backends.k8s.objects import CUSTOM, RUN_LABEL, RunPod, output_claim, run_objects, run_pods, set_owner
from launcher.backends.k8s.podwatch import PodWatch
from launcher.errors import BackendError
from launcher.k8s_manifests import CLAIM_RUNS_DIR
from launcher.liveview import LiveView
from launcher.plan import STATUS_DIR, LaunchPlan
from launcher.runs import MIRROR_DIR, RunRecord
from launcher.stall import STACKS_REQUEST, STACKS_WAIT_S, Stall, StallWatch

REQUEST_TIMEOUT = 30  # seconds, every API call
DELETE_WAIT = 120
# Who serves a custom kind, for the 404 of a cluster without it.
_SERVED_BY = {"PodGroup": "Volcano", "Job": "Volcano", "AscendJob": "MindCluster's Ascend Operator"}
# The core kinds a run creates, as the client's method names spell them (create_namespaced_config_map, ...).
_CORE = {"ConfigMap": "config_map", "Secret": "secret", "Service": "service", "Pod": "pod"}


class KubeRun:
    def __init__(self, plan: LaunchPlan, run_dir: Path, record: RunRecord, target: Target,
                 secrets: Mapping[str, str] | None = None):
        """secrets: the secret_env values read for `up`, which go into the run's Secret."""
        from kubernetes import client

        self.plan, self.run_dir, self.record, self.target = plan, run_dir, record, target
        self.objects = run_objects(plan, record.run_id, target.namespace, secrets)
        self.ns = self.objects[0]["metadata"]["namespace"]
        self.api = api_client(target)
        self.core, self.custom = client.CoreV1Api(self.api), client.CustomObjectsApi(self.api)
        self.selector = f"{RUN_LABEL}={record.run_id}"
        self.run_pods: dict[str, RunPod] = {pod.name: pod for pod in run_pods(plan, self.objects)}
        self.claim = output_claim(self.objects)  # the claim the pods mount at output/, if any
        self.seen: set[str] = set()  # pods seen so far: a job's controller makes its pods after create_all
        self.watcher = PodWatch(self.core, self.ns, self.selector, self.api.configuration.host, REQUEST_TIMEOUT)
        self.failed_rank: int | None = None
        self.stalled: Stall | None = None  # the stall watchdog's finding, when it ended the watch
        claim_dir = target.claim_folder(record.run_id) if self.claim is not None else None
        self.consoles = Consoles(self.core, self.ns, plan, self.run_pods, run_dir / MIRROR_DIR, claim_dir,
                                 REQUEST_TIMEOUT)

    # --- the API, per kind ---------------------------------------------------------------------

    def call(self, what: str, fn, *args, **kwargs):
        """One API call with a timeout; a network failure becomes a BackendError naming the server."""
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs, _request_timeout=REQUEST_TIMEOUT)
        except HTTPError as exc:
            raise BackendError(f"{what}: cannot reach the Kubernetes API at {self.api.configuration.host}: "
                               f"{exc}") from None

    def core_api(self, verb: str, kind: str):
        return getattr(self.core, f"{verb}_namespaced_{_CORE[kind]}")

    def create(self, obj: dict):
        kind, ns = obj["kind"], self.ns
        what = f"create {kind} {obj['metadata']['name']}"
        if kind in CUSTOM:
            group, version, plural = CUSTOM[kind]
            return self.call(what, self.custom.create_namespaced_custom_object, group, version, ns, plural, obj)
        return self.call(what, self.core_api("create", kind), ns, obj)

    def delete(self, kind: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind in CUSTOM:
                group, version, plural = CUSTOM[kind]
                self.call(f"delete {kind} {name}", self.custom.delete_namespaced_custom_object,
                          group, version, self.ns, plural, name)
                return
            # A pod keeps its grace period: deleting it with none would remove it from the API while its
            # node still runs it (a force deletion). wait_gone waits for the node to end it.
            self.call(f"delete {kind} {name}", self.core_api("delete", kind), name, self.ns)
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we want
                raise BackendError(f"delete {kind} {name}: {api_message(exc)}") from None

    def names(self, kind: str) -> list[str]:
        """Names of the run's objects of a kind (by label)."""
        from kubernetes.client.exceptions import ApiException

        try:
            if kind in CUSTOM:
                group, version, plural = CUSTOM[kind]
                found = self.call(f"list {plural}", self.custom.list_namespaced_custom_object, group, version,
                                  self.ns, plural, label_selector=self.selector)
                return [o["metadata"]["name"] for o in found.get("items", [])]
            found = self.call(f"list {kind}", self.core_api("list", kind), self.ns, label_selector=self.selector)
            return [o.metadata.name for o in found.items]
        except ApiException as exc:
            if exc.status == 404:  # the kind is not served (no Volcano, no Ascend Operator), so there is none
                return []
            raise BackendError(f"list {kind}: {api_message(exc)}") from None

    # --- up ------------------------------------------------------------------------------------

    def create_all(self, replace: bool) -> None:
        """Create every object; on any failure delete what was created and raise."""
        from kubernetes.client.exceptions import ApiException

        created: list[tuple[str, str]] = []
        try:
            owner_uid = None
            for obj in self.objects:
                kind, name = obj["kind"], obj["metadata"]["name"]
                if owner_uid:
                    set_owner(obj, owner_uid)
                try:
                    result = self.create(obj)
                except ApiException as exc:
                    if exc.status == 404 and kind in CUSTOM:
                        group, version, plural = CUSTOM[kind]
                        raise BackendError(f"{kind} {self.ns}/{name}: the cluster does not serve {group}/{version} "
                                           f"{plural}; {_SERVED_BY[kind]} must be installed") from None
                    if exc.status != 409:
                        raise BackendError(f"{kind} {self.ns}/{name}: the API refused it ({exc.status}): "
                                           f"{api_message(exc)}") from None
                    if not replace:
                        raise BackendError(f"{kind} {self.ns}/{name} already exists; delete it "
                                           "or pass --replace to replace it") from None
                    self.delete(kind, name)
                    self.wait_gone({kind: [name]})
                    result = self.create(obj)
                created.append((kind, name))
                if kind == "ConfigMap":
                    owner_uid = result.metadata.uid
                    if not owner_uid:
                        raise BackendError(f"ConfigMap {name}: the API server returned no uid to own the pods")
        except BaseException as exc:
            for kind, name in reversed(created):
                self.delete(kind, name)
            if isinstance(exc, BackendError) and created:
                made = "the object created before it was" if len(created) == 1 else \
                    f"the {len(created)} objects created before it were"
                raise BackendError(f"{exc}\n{made} deleted") from None
            raise

    # --- watching ------------------------------------------------------------------------------

    def pods(self) -> dict:
        """The run's pods now, as the watch has brought them (podwatch.py)."""
        return self.watcher.pods()

    def watch(self, view: LiveView, pending_timeout: float) -> tuple[str, str]:
        """Until every rank's pod succeeds, one fails or is deleted, or pods stay Pending (or a job's
        controller makes none) too long."""
        started = time.monotonic()
        ranked = [name for name, pod in self.run_pods.items() if pod.ranks]
        while True:
            pods = {name: pod for name, pod in self.pods().items() if name in self.run_pods}
            self.seen |= set(pods)
            self.mirror(pods, follow=True)
            view.update()
            if view.stalled is not None:
                self.stalled = view.stalled
                self.request_stacks()
                return "stalled", view.stalled.message()
            # A pod ended by its deletion (kubectl, the garbage collector, an eviction) did not fail by itself.
            deleting = {name for name, pod in pods.items()
                        if pod.metadata.deletion_timestamp and phase(pod) != "Succeeded"}
            failed = sorted((finished_at(pod), name) for name, pod in self.watcher.failures.items()
                            if name in self.run_pods)
            if failed:
                self.failed_rank = self.failing_rank(self.run_pods[failed[0][1]])  # the others may have followed it
                names = ", ".join(f"{name} ({self.run_pods[name].describe()})" for _, name in failed)
                return "failed", f"pods failed: {names}"
            gone = sorted(name for name in (self.seen - set(pods)) | deleting if name in ranked)
            if gone:
                return "failed", f"pods deleted while the job ran: {', '.join(gone)}"
            if all(name in pods and phase(pods[name]) == "Succeeded" for name in ranked):
                return "succeeded", ""  # a scheduler pod may still be ending, or its controller removed it
            waiting = [name for name in self.run_pods if name not in pods or phase(pods[name]) in (None, "Pending")]
            if waiting and time.monotonic() - started > pending_timeout:
                return "pending", self.pending_reasons(pods, waiting, pending_timeout)

    def request_stacks(self) -> None:
        """Have every rank write its Python stacks to its console before the run is stopped: no exec here,
        so through the request file its entrypoint looks for on the claim (STACKS_REQUEST)."""
        request = self.consoles.on_claim(f"{STATUS_DIR}/{STACKS_REQUEST}")
        if request is None:
            return
        request.parent.mkdir(parents=True, exist_ok=True)
        request.touch()
        time.sleep(STACKS_WAIT_S + 1)  # the ranks look once a second; their stacks then reach the log streams

    def failing_rank(self, pod: RunPod) -> int | None:
        """The rank a failed pod names: its one rank, or the first of its node's ranks that exited non-zero."""
        if len(pod.ranks) <= 1:
            return pod.ranks[0] if pod.ranks else None
        for rank in pod.ranks:
            code = self.consoles.mirror_dir / STATUS_DIR / f"rank_{rank}.exit"
            if code.is_file() and code.read_text().strip() not in ("", "0"):
                return rank
        return pod.ranks[0]

    def pending_reasons(self, pods: dict, waiting: list[str], timeout: float) -> str:
        lines = [f"{len(waiting)} pods still Pending after {timeout:.0f}s:"]
        for name in waiting:
            if name not in pods:  # its job's controller has not made it: why is on the job
                jobs = [o["metadata"]["name"] for o in self.objects if o["kind"] in ("Job", "AscendJob")]
                reasons = [reason for job in jobs for reason in self.warnings(job)]
                lines.append(f"  {name}: not created yet; {'; '.join(reasons) or 'no events'}")
                continue
            reasons = self.warnings(name)
            for status in (pods[name].status.container_statuses or []) if pods[name].status else []:
                if status.state and status.state.waiting and status.state.waiting.reason:
                    reasons.append(f"{status.state.waiting.reason}: {status.state.waiting.message or ''}")
            lines.append(f"  {name}: {'; '.join(dict.fromkeys(reasons)) or 'no events'}")
        return "\n".join(lines)

    def warnings(self, name: str) -> list[str]:
        events = self.call("list events", self.core.list_namespaced_event, self.ns,
                           field_selector=f"involvedObject.name={name}").items
        return list(dict.fromkeys(f"{e.reason}: {e.message}" for e in events if e.type == "Warning"))

    def pod_of_rank(self, rank: int) -> RunPod:
        return next(pod for pod in self.run_pods.values() if rank in pod.ranks)

    def console(self, rank: int) -> str | None:
        return self.consoles.console(self.pod_of_rank(rank), rank)

    def mirror(self, pods: dict, follow: bool = False) -> Path:
        return self.consoles.mirror(pods, follow)

    # --- teardown and gather -------------------------------------------------------------------

    def delete_all(self) -> list[str]:
        """Delete every object of the run (pods first, the owner last) and wait until they are gone."""
        # Secrets only where the run has one: listing them may need a permission other runs do not.
        secret = ("Secret",) if secret_env.read_here(secret_env.plan_sources(self.plan.artifacts)) else ()
        # The job first, so that its controller makes no new pods for those deleted here.
        jobs = [kind for kind in ("AscendJob", "Job") if any(o["kind"] == kind for o in self.objects)]
        found = {kind: self.names(kind) for kind in (*jobs, "Pod", "PodGroup", "Service", *secret, "ConfigMap")}
        for kind, names in found.items():
            for name in names:
                self.delete(kind, name)
        return self.wait_gone(found)

    def wait_gone(self, found: dict[str, list[str]]) -> list[str]:
        deadline = time.monotonic() + DELETE_WAIT
        while True:
            left = []
            for kind, names in found.items():
                present = set(self.names(kind)) if names else set()  # one list per kind, not per object
                left += [f"{kind} {name}" for name in names if name in present]
            if not left or time.monotonic() > deadline:
                return [f"still there {DELETE_WAIT}s after deletion: {', '.join(left)}"] if left else []
            time.sleep(0.5)

    def gather_logs(self) -> None:
        """Every started pod's log through the API: a rank's into ranks/rank_N/console.log, a node's
        (msrun's own output) into nodes/node-N/node.log, a scheduler's into nodes/scheduler.log."""
        for name, pod in self.run_pods.items():
            text = self.consoles.log(name)
            streamed = self.consoles.streamed_console(name, pod.ranks[0]) if pod.own_console else None
            if text is None and streamed is not None:  # the pod is gone (deleted, evicted): its streamed log
                text = streamed.read_text(errors="replace")
            if text is None:
                continue
            if pod.own_console:
                dest = self.run_dir / gather.rank_dir(pod.ranks[0]) / "console.log"
            elif pod.node is not None:
                dest = self.run_dir / "nodes" / f"node-{pod.node}" / "node.log"
            else:
                dest = self.run_dir / "nodes" / "scheduler.log"
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f".{dest.name}.partial")
            partial.write_text(text)
            os.replace(partial, dest)

    def gather_outputs(self, need_checkpoints: bool) -> list[str]:
        """The ranks' files under output/ from the output PVC mounted at --pvc-dir. Returns problems."""
        claim = self.claim
        if claim is None or not self.target.pvc_dir:
            why = (f"mount the claim {claim!r} on this machine and pass --pvc-dir" if claim else
                   "the pods wrote them to an emptyDir, gone with the pods; set cluster.k8s.output_pvc")
            return [f"the ranks' output/ (logs, checkpoints) was not gathered: {why}"] if need_checkpoints else []
        claim_root = Path(self.target.pvc_dir)
        if not claim_root.is_dir():
            return [f"--pvc-dir {claim_root} is not a directory; the ranks' output/ was not gathered"]
        root = self.target.claim_folder(self.record.run_id)  # the run's own folder (k8s_manifests._container)
        if not root.is_dir():
            return ([f"the claim has no {CLAIM_RUNS_DIR}/{self.record.run_id}/ at --pvc-dir {claim_root}: the pods "
                     "wrote no output there; check that --pvc-dir is where the claim is mounted"]
                    if need_checkpoints else [])
        paths = [f"output/{p.relative_to(root)}" for p in root.rglob("*") if p.is_file()]
        # From the API instead: a per-rank pod's log.
        consoles = {self.plan.ranks[pod.ranks[0]].console_log for pod in self.run_pods.values() if pod.own_console}
        for item in gather.wanted_from_paths(self.plan, paths):
            if item.source not in consoles:
                gather.copy_verified(root / item.source.removeprefix("output/"), self.run_dir / item.dest)
        missing = [r for r in range(self.plan.world_size)
                   if not list((self.run_dir / gather.rank_dir(r) / "checkpoint").glob("*.ckpt"))]
        if need_checkpoints and missing:
            return [f"rank {r}: no checkpoint found under {root}/checkpoint/rank_{r}/" for r in missing]
        return []


def execute(plan: LaunchPlan, run_dir: Path, record: RunRecord, console: Console, target: Target, replace: bool,
            pending_timeout: float, secrets: Mapping[str, str] | None = None) -> tuple[RunRecord, list[str]]:
    """Create, watch, gather and always delete the run. Returns the final record and the problems."""
    run = KubeRun(plan, run_dir, record, target, secrets)
    target.save(run_dir)
    try:
        run.create_all(replace)
    except KeyboardInterrupt:
        raise BackendError("interrupted while creating the objects; those created were deleted") from None
    record.state = "running"
    record.save(run_dir)
    outcome, detail = "interrupted", ""
    try:
        with LiveView(plan, run_dir / MIRROR_DIR, console, title=record.run_id,
                      watch=StallWatch.for_plan(plan)) as view:
            outcome, detail = run.watch(view, pending_timeout)
    except KeyboardInterrupt:
        pass
    except BackendError as exc:  # the API failed while watching: still gather and delete
        outcome, detail = "error", str(exc)
    finally:
        problems = []
        with teardown_shield():
            for step in (run.gather_logs, run.delete_all):  # the logs first: they go with the pods
                try:
                    problems += step() or []
                except BackendError as exc:
                    problems.append(f"{exc}; 'launcher down {record.run_id}' deletes what is left")
            run.consoles.close()
    record.finished = time.time()
    record.state = {"succeeded": "succeeded", "interrupted": "interrupted"}.get(outcome, "failed")
    record.exit_code = {"succeeded": 0, "interrupted": 130}.get(outcome, 1)
    if outcome in ("failed", "error"):
        record.failed_rank = run.failed_rank
        record.message = detail
    elif outcome == "stalled":
        record.failed_rank, record.message = run.stalled.rank, detail
    elif outcome == "pending":
        record.message = f"{detail}\nevery object of the run was deleted"
    record.save(run_dir)
    problems += run.gather_outputs(need_checkpoints=outcome == "succeeded")
    return record, problems


def reconnect(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> KubeRun:
    return KubeRun(plan, run_dir, record, Target.load(run_dir))
