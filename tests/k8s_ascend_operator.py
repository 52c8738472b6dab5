"""A test stand-in for MindCluster's Ascend Operator, the controller of AscendJob (mindxdl.gitee.com/v1):
its Go module (path `ascend-operator`, no host; ascend-common by a local replace) cannot come from the Go
module proxy, so the real program cannot be built here. This does, for MindSpore jobs, what it does, as read in
Ascend/mind-cluster @ 22bb3d987bc0208c3eb7395e222b661276133c58 component/ascend-operator (pkg/controllers/v1,
pkg/api/v1/defaults.go; names from component/ascend-common/api) and kubeflow/common @ v0.4.3 (its go.mod
version: pkg/controller.v1/common, pkg/util/status.go):
- validates first (ascendjob_validate.go: Scheduler/Worker only, one Scheduler, an `ascend` container with
  an image, successPolicy "" or AllWorkers, the queue exists), else Failed/JobValidFailed; then defaults
  (defaults.go: replicas 1, restartPolicy Never, cleanPodPolicy None, port `ascendjob-port` 2222 on the
  `ascend` container of each replica type but Worker).
- a Service `<job>-scheduler-0` (jobinfo.go getOrCreateSvc, service.go genService) selecting the Scheduler
  pod by the operator's labels, with its `ascend` container's ports, owned by the job.
- a pod per replica, `<job>-<replica type lowercase>-<index>` (kubeflow GenGeneralName, pod.go createPodSpec):
  the template's labels plus kubeflow's GenLabels and replica type/index labels, version "0" and, on the
  Scheduler, training.kubeflow.org/job-role=master (labels.go); annotation hccl/rankIndex (annotation.go);
  an ownerReference (controller, blockOwnerDeletion); the replica's restartPolicy over the template's.
- the `ascend` container's env (env.go setCommonEnv, setMindSporeEnv): ASCEND_VISIBLE_DEVICES (a fieldRef to
  the device plugin's annotation, when every request is an NPU), MINDX_TASK_ID (the job's uid),
  MINDX_SERVER_IP/DOMAIN (ClusterD's Service), HostNetwork, HCCL_LOGIC_SUPERPOD_ID (NPU containers),
  REPLICA_TYPE; then, only when the Worker's `ascend` container requests huawei.com/* NPUs (pod.go setEnv
  stops before setMindSporeEnv at 0): MS_SCHED_HOST, MS_LOCAL_WORKER = that count, MS_WORKER_NUM = it x the
  Worker replicas, MS_NODE_RANK = the index, MS_SCHED_PORT, MS_SERVER_NUM=0, MS_ROLE (MS_SCHED/MS_WORKER),
  NPU_POD. So a CPU job gets no MS_* env from the operator, only its template's; a lone Worker gets none.
- gang scheduling (job.go isPodGroupSynced/createPodGroup, pod.go setGangScheduleInfo): a Volcano PodGroup
  `<job>-<uid>` with the job's labels and annotations, minMember (minAvailable, else every replica),
  minTaskMember, queue, priorityClassName, minResources (the first minMember pods' requests), owned by the
  job; no pods until Volcano takes it past Pending; the pods get schedulerName volcano and the annotations
  scheduling.k8s.io/group-name and volcano.sh/task-spec.
- status by PUT of /status (job.go checkSpecStatus, kubeflow setCondition): Created/JobCreated, Running/
  JobRunning while a pod runs, Failed/JobFailed once one failed, Succeeded (reason JobRunning, sic) when none
  failed or runs and some succeeded; replicaStatuses. successPolicy AllWorkers is only validated. A finished
  job (handleFinishedJob): its Pending pods are deleted; cleanPodPolicy None (the default) leaves running
  pods running, Running deletes them, All every pod (and a Service of a pod's name); the PodGroup is
  deleted; ttlSecondsAfterFinished deletes the job.
The one difference: a Worker's MS_SCHED_HOST is the Service's ClusterIP in the operator (the Scheduler's
own is a status.podIP fieldRef, as here); no kube-proxy runs here, so this writes `<job>-scheduler-0.<ns>.svc`,
which the node agent resolves to 127.0.0.1. Also: the operator gang-schedules every job (-enableGangScheduling,
default true), this only jobs whose spec.schedulerName is volcano; it lists jobs and pods every 0.2 s where
the operator's informers watch. Not done: PyTorch/TensorFlow, rank tables, restartPolicy ExitCode restarts,
backoffLimit and the pod version count, fault-recovery/hot-switch/sub-health env, soft-share and super-pod
soft strategy, Schedulers that mount NPUs, priority classes in minResources.
A deleted job's objects go with the garbage collector (ownerReferences); it is no longer listed, so nothing
is recreated.
"""

from __future__ import annotations

import copy
import datetime
import json
import threading
import time
from pathlib import Path

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

GROUP, VERSION, PLURAL = "mindxdl.gitee.com", "v1", "ascendjobs"
PG = ("scheduling.volcano.sh", "v1beta1")
CRD = Path(__file__).parent / "data" / "k8s" / "ascendjob-crd.yaml"
KF = "training.kubeflow.org/"
PORT_NAME, DEFAULT_PORT = "ascendjob-port", 2222  # ascend-common api/default_name.go, pkg/api/v1/constants.go
NPU_NAMES = {"huawei.com/npu", "huawei.com/Ascend310", "huawei.com/Ascend310P", "huawei.com/Ascend910"}
CLUSTERD = ("clusterd-grpc-svc", "mindx-dl", "clusterd-grpc-svc.mindx-dl.svc.cluster.local")  # consts.go


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ascend(spec: dict) -> dict | None:
    return next((c for c in spec.get("containers", []) if c["name"] == "ascend"), None)


def _npu_request(container: dict | None) -> tuple[str, int]:
    """The first huawei.com/* request and its count (utils.go getContainerNPUResourceNameAndReq)."""
    for name, value in ((container or {}).get("resources", {}).get("requests") or {}).items():
        if "huawei.com/" in name:
            return name, int(parse_quantity(value))
    return "", 0


def _done(status: dict, ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] == "True" for c in status["conditions"])


def set_condition(status: dict, ctype: str, reason: str, message: str) -> None:
    """kubeflow/common pkg/util/status.go UpdateJobConditions/setCondition/filterOutCondition."""
    current = next((c for c in status["conditions"] if c["type"] == ctype), None)
    if _done(status, "Failed") or (current and current["status"] == "True" and current.get("reason") == reason):
        return
    kept = []
    for c in status["conditions"]:
        if c["type"] == ctype or {c["type"], ctype} == {"Running", "Restarting"}:
            continue
        kept.append({**c, "status": "False"} if ctype in ("Failed", "Succeeded") and c["type"] == "Running" else c)
    now = _now()
    since = current["lastTransitionTime"] if current and current["status"] == "True" else now
    status["conditions"] = kept + [{"type": ctype, "status": "True", "reason": reason, "message": message,
                                    "lastUpdateTime": now, "lastTransitionTime": since}]


class AscendOperator:
    def __init__(self, plane, namespace: str = "default"):
        api = plane.client("admin")
        self.core, self.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        self.extensions = client.ApiextensionsV1Api(api)
        self.namespace = namespace
        self.errors: list[Exception] = []
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def install_crd(self, timeout: float = 60) -> None:
        """Apply the CRD (once per control plane) and wait until it is Established."""
        crd = yaml.safe_load(CRD.read_text())
        try:
            self.extensions.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
        deadline = time.monotonic() + timeout
        while not any(c.type == "Established" and c.status == "True" for c in
                      self.extensions.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []):
            if time.monotonic() > deadline:
                raise RuntimeError(f"CRD {crd['metadata']['name']} not established within {timeout}s")
            time.sleep(0.2)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(15)

    def _loop(self):
        while not self._stop.is_set():
            try:
                for job in self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]:
                    try:
                        self.reconcile(job)
                    except ApiException as exc:
                        if exc.status not in (404, 409):  # deleted or changed meanwhile: the next pass
                            self.errors.append(exc)
            except Exception as exc:  # noqa: BLE001 - a stand-in reports, the test asserts
                if not self._stop.is_set():
                    self.errors.append(exc)
            self._stop.wait(0.2)

    def reconcile(self, job: dict) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp") or (meta.get("labels") or {}).get("framework") != "mindspore":
            return  # ascendjob_controller.go Reconcile leaves a job being deleted alone
        status = copy.deepcopy(job.get("status") or {})
        status.setdefault("conditions", [])
        status.setdefault("replicaStatuses", {})
        old = copy.deepcopy(status)
        if meta["uid"] not in self._seen:  # ascendJobCreateFunc, on the create event
            self._seen.add(meta["uid"])
            set_condition(status, "Created", "JobCreated", f"Job {meta['name']} is create.")
        spec = copy.deepcopy(job["spec"])
        gang = spec.get("schedulerName") == "volcano"
        invalid = self._invalid(spec, gang)
        if invalid:
            set_condition(status, "Failed", "JobValidFailed", invalid)
        else:
            self._default(spec)
            pods = json.loads(self.core.list_namespaced_pod(
                self.namespace, label_selector=f"{KF}job-name={meta['name']}", _preload_content=False).data)["items"]
            if _done(status, "Succeeded") or _done(status, "Failed"):
                self._finish(job, spec, status, pods, gang)
            elif not gang or self._pod_group_ready(job, spec, status):
                self._sync(job, spec, status, pods, gang)
        if status != old:  # UpdateJobStatusInApiServer
            self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, meta["name"], {**job, "status": status})

    def _invalid(self, spec: dict, gang: bool) -> str | None:
        """ascendjob_validate.go for MindSpore: "<reason>: <message>" of the first problem."""
        specs, policy = spec.get("replicaSpecs") or {}, (spec.get("runPolicy") or {}).get("schedulingPolicy")
        if spec.get("successPolicy") not in (None, "", "AllWorkers"):
            return "InvalidSuccessPolicy: job success policy is invalid, it must be one of <\"\", AllWorkers>"
        if gang and policy is not None:
            try:
                self.custom.get_cluster_custom_object(*PG, "queues", policy.get("queue", ""))
            except ApiException as exc:
                return f"InvalidQueue: check queue<{policy.get('queue', '')}> failed, err: {exc.reason}"
        for rtype, rspec in specs.items():
            replicas, pod = (rspec or {}).get("replicas", 1), ((rspec or {}).get("template") or {}).get("spec", {})
            if rtype not in ("Scheduler", "Worker"):
                return f"InvalidReplicaType: replicaType is {rtype} but must be one of [Scheduler Worker]"
            if not pod.get("containers") or not 0 <= replicas <= 20000 or (rtype == "Scheduler" and replicas != 1):
                return f"InvalidReplicaSpec: {rtype} replicaSpec is not valid"
            if not (_ascend(pod) or {}).get("image"):
                return f"InvalidContainer: {rtype} replicaSpec is not valid: no container named ascend with an image"
        worker = specs.get("Worker")
        if worker and "Scheduler" not in specs and (
                _npu_request(_ascend(worker["template"]["spec"]))[1] * worker.get("replicas", 1) > 1):
            return "InvalidReplicaSpec: replicaSpec is not valid: when scheduler not found, the req num must be 1"
        return None

    @staticmethod
    def _default(spec: dict) -> None:
        """pkg/api/v1/defaults.go SetDefaultsAscendJob."""
        spec.setdefault("runPolicy", {}).setdefault("cleanPodPolicy", "None")
        for rtype, rspec in spec["replicaSpecs"].items():
            rspec.setdefault("replicas", 1)
            rspec["restartPolicy"] = rspec.get("restartPolicy") or "Never"
            container = _ascend(rspec["template"]["spec"]) or rspec["template"]["spec"]["containers"][0]
            if rtype != "Worker" and not any(p.get("name") == PORT_NAME for p in container.get("ports", [])):
                container.setdefault("ports", []).append({"name": PORT_NAME, "containerPort": DEFAULT_PORT})

    @staticmethod
    def _owner(job: dict) -> list[dict]:
        return [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "AscendJob", "name": job["metadata"]["name"],
                 "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]

    @staticmethod
    def _labels(job: dict, rtype: str, index: int) -> dict:
        """kubeflow JobController.GenLabels (ControllerName, GetGroupNameLabelValue) + SetReplicaType/Index."""
        name, rt = job["metadata"]["name"], rtype.lower()
        return {f"{KF}operator-name": "ascendjob-controller", "group-name": GROUP, f"{KF}job-name": name,
                "job-name": name, f"{KF}replica-type": rt, "replica-type": rt,
                f"{KF}replica-index": str(index), "replica-index": str(index)}

    def _pod_group_ready(self, job: dict, spec: dict, status: dict) -> bool:
        meta, specs = job["metadata"], spec["replicaSpecs"]
        name = f"{meta['name']}-{meta['uid']}"
        try:
            group = self.custom.get_namespaced_custom_object(*PG, self.namespace, "podgroups", name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            policy = spec["runPolicy"].get("schedulingPolicy") or {}
            members = policy.get("minAvailable", sum(r["replicas"] for r in specs.values()))
            group = self.custom.create_namespaced_custom_object(*PG, self.namespace, "podgroups", {
                "apiVersion": "/".join(PG), "kind": "PodGroup",
                "metadata": {"name": name, "labels": meta.get("labels", {}),
                             "annotations": meta.get("annotations", {}), "ownerReferences": self._owner(job)},
                "spec": {"minMember": members, "minTaskMember": {t.lower(): r["replicas"] for t, r in specs.items()},
                         "queue": policy.get("queue", ""), "priorityClassName": policy.get("priorityClass", ""),
                         "minResources": policy.get("minResources") or self._min_resources(specs, members)}})
        phase = (group.get("status") or {}).get("phase", "")
        if phase in ("", "Pending"):  # no pods before Volcano enqueues the group
            set_condition(status, "Created", "PodGroupPending" if phase else "PodGroupNotInitialized",
                          "the cluster resource is not enough" if phase else "volcano-scheduler is maybe not running")
            return False
        return True

    @staticmethod
    def _min_resources(specs: dict, members: int) -> dict:
        """kubeflow CalcPGMinResources: the requests (else limits) of the first `members` pods."""
        total: dict = {}
        for rspec in [r for r in specs.values() for _ in range(r["replicas"])][:members]:
            for c in rspec["template"]["spec"]["containers"]:
                resources = c.get("resources") or {}
                for key, value in (resources.get("requests") or resources.get("limits") or {}).items():
                    total[key] = total.get(key, 0) + parse_quantity(value)
        return {key: str(value) for key, value in total.items()}

    def _service(self, job: dict, spec: dict) -> tuple[str, str]:
        """jobinfo.go getOrCreateSvc, service.go genService: `<job>-scheduler-0`; (host, port) for the env."""
        name = f"{job['metadata']['name']}-scheduler-0"
        try:
            svc = self.core.read_namespaced_service(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            labels = self._labels(job, "Scheduler", 0)
            ports = _ascend(spec["replicaSpecs"]["Scheduler"]["template"]["spec"]).get("ports", [])
            svc = self.core.create_namespaced_service(self.namespace, {
                "metadata": {"name": name, "labels": labels, "ownerReferences": self._owner(job)},
                "spec": {"selector": labels, "ports": [{"name": p["name"], "port": p["containerPort"]}
                                                       for p in ports]}})
        port = next(str(p.port) for p in svc.spec.ports if p.name == PORT_NAME)
        return f"{name}.{self.namespace}.svc", port  # the operator: svc.spec.clusterIP

    def _sync(self, job: dict, spec: dict, status: dict, pods: list[dict], gang: bool) -> None:
        """job.go syncReplicas, pod.go ReconcilePods/reconcilePods, then UpdateJobStatus/checkSpecStatus."""
        specs, meta = spec["replicaSpecs"], job["metadata"]
        lone = len(specs) == 1  # a MindSpore job of one Worker: no Service, no env (pod.go setEnv)
        host, port = ("", "") if lone else self._service(job, spec)
        npu, count = _npu_request(_ascend(specs["Worker"]["template"]["spec"])) if "Worker" in specs else ("", 0)
        try:
            clusterd = self.core.read_namespaced_service(*CLUSTERD[:2]).spec.cluster_ip  # service.go getClusterDSvcIp
        except ApiException:
            clusterd = CLUSTERD[2]
        ctx = {"host": host, "port": port, "npu": npu, "count": count, "lone": lone, "gang": gang,
               "workers": specs.get("Worker", {}).get("replicas", 0), "clusterd": clusterd}
        for rtype, rspec in specs.items():
            counts = status["replicaStatuses"][rtype] = {}  # initializeReplicaStatuses
            mine = {int(p["metadata"]["labels"].get(f"{KF}replica-index", -1)): p for p in pods
                    if p["metadata"]["labels"].get(f"{KF}replica-type") == rtype.lower()}
            for index in range(rspec["replicas"]):
                if index not in mine:
                    self.core.create_namespaced_pod(self.namespace, self._pod(job, spec, rtype, index, ctx))
                    continue
                pod = mine[index]
                key = {"Running": "active", "Succeeded": "succeeded", "Failed": "failed"}.get(
                    pod["status"].get("phase"))
                if key and not (key == "failed" and pod["metadata"].get("deletionTimestamp")):
                    counts[key] = counts.get(key, 0) + 1
        status.setdefault("startTime", _now())
        total = {k: sum(s.get(k, 0) for s in status["replicaStatuses"].values())
                 for k in ("active", "succeeded", "failed")}
        ns, name = self.namespace, meta["name"]
        if total["failed"]:
            set_condition(status, "Failed", "JobFailed", f"Job <{ns}/{name}> has failed because has pod failed.")
        elif total["active"]:
            set_condition(status, "Running", "JobRunning", f"Job {ns}/{name} is running.")
        elif total["succeeded"] or total["succeeded"] == sum(r["replicas"] for r in specs.values()):
            set_condition(status, "Succeeded", "JobRunning", f"Job<{ns}-{name}> successfully completed.")
        if _done(status, "Failed") or _done(status, "Succeeded"):
            status.setdefault("completionTime", _now())

    def _pod(self, job: dict, spec: dict, rtype: str, index: int, ctx: dict) -> dict:
        """pod.go createPodSpec: name, env (env.go), labels, annotations, restartPolicy, gang information."""
        meta, rspec = job["metadata"], spec["replicaSpecs"][rtype]
        template = copy.deepcopy(rspec["template"])
        tmeta, pspec = template.get("metadata") or {}, template["spec"]
        container = _ascend(pspec)
        if not ctx["lone"]:
            env = container.setdefault("env", [])
            npu_name, npus = _npu_request(container)
            if npu_name and set((container.get("resources") or {}).get("requests") or {}) <= NPU_NAMES:
                env.append({"name": "ASCEND_VISIBLE_DEVICES", "valueFrom": {"fieldRef": {
                    "fieldPath": f"metadata.annotations['{npu_name}']"}}})  # not isVirtualResourceReq
            env += [{"name": "MINDX_TASK_ID", "value": meta["uid"]},
                    {"name": "MINDX_SERVER_IP", "value": ctx["clusterd"]},
                    {"name": "MINDX_SERVER_DOMAIN", "value": CLUSTERD[2]},
                    {"name": "HostNetwork", "value": str(bool(pspec.get("hostNetwork"))).lower()}]
            if npu_name:  # addHcclSuperPodIdEnv, superpod.go GetLogicSuperPodId
                block = int((meta.get("annotations") or {}).get("sp-block") or 0)
                per = 1 if block < npus else block // npus
                env.append({"name": "HCCL_LOGIC_SUPERPOD_ID",
                            "value": str(index // per if block > 0 and npus > 0 else 0)})
            env.append({"name": "REPLICA_TYPE", "value": rtype})
            if ctx["count"]:  # setMindSporeEnv
                env.append({"name": "MS_SCHED_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                           if rtype == "Scheduler" else {"name": "MS_SCHED_HOST", "value": ctx["host"]})
                if ctx["npu"] != "huawei.com/npu-core":  # not a dynamic-cut job
                    env += [{"name": "MS_LOCAL_WORKER", "value": str(ctx["count"])},
                            {"name": "MS_WORKER_NUM", "value": str(ctx["count"] * ctx["workers"])}]
                env += [{"name": "MS_NODE_RANK", "value": str(index)}, {"name": "MS_SCHED_PORT", "value": ctx["port"]},
                        {"name": "MS_SERVER_NUM", "value": "0"},
                        {"name": "MS_ROLE", "value": "MS_SCHED" if rtype == "Scheduler" else "MS_WORKER"},
                        {"name": "NPU_POD", "value": str(npus > 0).lower()}]
        labels = {**(tmeta.get("labels") or {}), "version": "0", **self._labels(job, rtype, index)}
        if rtype == "Scheduler":
            labels[f"{KF}job-role"] = "master"
        annotations = {**(tmeta.get("annotations") or {}), "hccl/rankIndex": str(index)}
        pspec["restartPolicy"] = "Never" if rspec["restartPolicy"] == "ExitCode" else rspec["restartPolicy"]
        if ctx["gang"]:
            if not any(r["template"]["spec"].get("schedulerName") for r in spec["replicaSpecs"].values()):
                pspec["schedulerName"] = "volcano"
            annotations["scheduling.k8s.io/group-name"] = f"{meta['name']}-{meta['uid']}"
            annotations["volcano.sh/task-spec"] = rtype.lower()
        return {"metadata": {"name": f"{meta['name']}-{rtype.lower()}-{index}", "labels": labels,
                             "annotations": annotations, "finalizers": tmeta.get("finalizers") or [],
                             "ownerReferences": self._owner(job)}, "spec": pspec}

    def _finish(self, job: dict, spec: dict, status: dict, pods: list[dict], gang: bool) -> None:
        """job.go handleFinishedJob, kubeflow DeletePodsAndServices and CleanupJob."""
        policy, meta = spec["runPolicy"]["cleanPodPolicy"], job["metadata"]
        for pod in pods:
            phase, name = pod["status"].get("phase"), pod["metadata"]["name"]
            clean = policy == "All" or (policy == "Running" and phase in ("Running", "Pending"))
            if phase == "Pending" or clean:  # deletePendingPods, whatever the policy
                self._delete(self.core.delete_namespaced_pod, name)
            if clean:
                self._delete(self.core.delete_namespaced_service, name)
        ttl, end = spec["runPolicy"].get("ttlSecondsAfterFinished"), status.get("completionTime")
        if ttl is not None and end and (
                time.time() > datetime.datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() + ttl):
            self._delete(lambda n, ns: self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, n),
                         meta["name"])
        if gang:
            self._delete(lambda n, ns: self.custom.delete_namespaced_custom_object(*PG, ns, "podgroups", n),
                         f"{meta['name']}-{meta['uid']}")
        if _done(status, "Succeeded"):
            for counts in status["replicaStatuses"].values():
                if counts.get("active"):
                    counts["succeeded"] = counts.get("succeeded", 0) + counts.pop("active")

    def _delete(self, fn, name: str) -> None:
        try:
            fn(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
