"""The Kubernetes backend as the runner sees it. `status|logs|gather|down RUN` reach the cluster again
through the run's k8s.json (kubeconfig, context, namespace, PVC directory)."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from launcher import attempts, gather, secret_env
from launcher.backends.base import Backend, Echo, Events, Outcome, Problem, Run, Status, sigterm_as_interrupt
from launcher.backends.k8s.api import Target, phase
from launcher.backends.k8s.cluster import KubeRun, execute, reconnect
from launcher.backends.k8s.podwatch import WATCH_SECONDS
from launcher.backends.k8s.objects import run_objects, run_pods
from launcher.errors import ConfigError, LauncherError
from launcher.liveview import LiveView
from launcher.plan import LaunchPlan
from launcher.runs import MIRROR_DIR, OUTPUT_DIR, RESUME_DIR, RUN_DATA_DIR, RunRecord
from launcher.spec import Job


def status(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> tuple[list[str], LiveView]:
    run = reconnect(plan, run_dir, record)
    pods = run.pods()
    lines = [f"pod {name} ({pod.describe()}): {phase(pods[name]) or 'Pending'}" if name in pods
             else f"pod {name} ({pod.describe()}): not in the cluster" for name, pod in run.run_pods.items()]
    run.mirror(pods)
    view = LiveView(plan, run_dir / MIRROR_DIR, Console(force_terminal=False), record.run_id)
    view.update()
    return lines, view


def logs(plan: LaunchPlan, run_dir: Path, record: RunRecord, ranks: list[int], follow: bool, prefix: bool,
         echo) -> list[str]:
    """Print the ranks' consoles (a per-rank pod's log subresource, or msrun's worker log on the
    claim); with follow, until every pod has ended. A console that is gone is read from the gathered
    console.log instead."""
    run = reconnect(plan, run_dir, record)
    names = {rank: run.pod_of_rank(rank).name for rank in ranks}
    offsets = {rank: 0 for rank in ranks}
    problems: list[str] = []
    while True:
        pods = run.pods() if follow else {}
        run.seen |= set(pods)
        running = follow and RunRecord.load(run_dir).state == "running"  # `up` started it and has not ended it
        waiting = []
        for rank in ranks:
            text, pod = run.console(rank), pods.get(names[rank])
            alive = pod is not None and phase(pod) in (None, "Pending", "Running")
            if follow and (alive or (pod is None and names[rank] not in run.seen and running)):
                waiting.append(rank)  # started or not, or its job's controller has not made the pod yet
                if text is None:
                    continue
            if text is None:
                saved = run_dir / gather.rank_dir(rank) / "console.log"
                if not saved.is_file():
                    problems.append(f"rank {rank}: pod {names[rank]} has no log and none was gathered")
                    continue
                text = saved.read_text(errors="replace")
            complete = text[: text.rfind("\n") + 1] if follow else text
            for line in complete[offsets[rank]:].splitlines():
                echo(f"[rank {rank}] {line}" if prefix else line)
            offsets[rank] = max(offsets[rank], len(complete))
        if not follow or not waiting or problems:
            return list(dict.fromkeys(problems))
        time.sleep(WATCH_SECONDS)


def gather_again(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> list[str]:
    """Logs of pods that still exist, and output/ from the PVC directory."""
    run: KubeRun = reconnect(plan, run_dir, record)
    run.gather_logs()
    return run.gather_outputs(need_checkpoints=record.state == "succeeded")


def down(plan: LaunchPlan, run_dir: Path, record: RunRecord) -> list[str]:
    return reconnect(plan, run_dir, record).delete_all()


def stage_resume(run_dir: Path, record: RunRecord, target: Target) -> None:
    """A resumed attempt's checkpoint (resume/rank_N/, staged by the runner) onto the claim, into the
    attempt's folder that its pods mount at output/ (so they load it from output/resume/)."""
    staged = run_dir / RESUME_DIR
    if not staged.is_dir():
        return
    if not target.pvc_dir:
        raise ConfigError("resume: the checkpoint to resume from goes onto the claim; pass --pvc-dir")
    dest = target.claim_folder(record.run_id) / RESUME_DIR
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        gather.copy_verified(path, dest / path.relative_to(staged))


class K8sBackend(Backend):
    """The ranks as pods, created through the Kubernetes API (cluster.py)."""

    name = "k8s"
    resume_dir = f"{OUTPUT_DIR}/{RESUME_DIR}"  # the pods' output/ is their attempt's folder on the claim
    OPTIONS = ("kubeconfig", "context", "namespace", "pvc_dir", "replace", "pending_timeout")

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None,
                 pvc_dir: str | None = None, replace: bool = False, pending_timeout: float = 600):
        self.target = Target(kubeconfig, context, namespace, str(Path(pvc_dir).resolve()) if pvc_dir else None)
        self.replace, self.pending_timeout = replace, pending_timeout

    def check_restart(self, plan: LaunchPlan) -> None:
        # The checkpoints an attempt resumes from are gathered from the claim, and go back onto it.
        job = plan.job()
        if job is not None and not job.cluster.k8s.output_pvc:
            raise ConfigError("restart: a Kubernetes run resumes from the checkpoints its ranks wrote to its "
                              "output claim; set cluster.k8s.output_pvc and pass --pvc-dir")

    def where(self, plan: LaunchPlan) -> str:
        return "Kubernetes"

    def check_host(self, job: Job) -> None:
        secret_env.resolve(job.secret_env)  # from_env/from_file are read here: fail before anything exists

    def check_plan(self, plan: LaunchPlan) -> None:
        secret_env.resolve(secret_env.plan_sources(plan.artifacts))

    def place_dataset(self, prepared: Path) -> tuple[str, Path]:
        """The dataset goes on the job's claim, mounted here at pvc_dir, under data/; the pods mount the
        claim at output/ in their working directory. Without pvc_dir it only names the dataset (render)."""
        name = prepared.name
        target = Path(self.target.pvc_dir) / RUN_DATA_DIR / name if self.target.pvc_dir else prepared
        return f"{OUTPUT_DIR}/{RUN_DATA_DIR}/{name}", target

    def check_data(self, job: Job) -> None:
        if not self.target.pvc_dir:
            raise ConfigError(f"data: the pods read the prepared dataset from the claim {job.cluster.k8s.output_pvc!r}; "
                              "mount it on this machine and pass --pvc-dir (the dataset goes to <pvc-dir>/data/)")

    def rank_location(self, run: Run, rank: int) -> str:
        pods = run_pods(run.plan, run_objects(run.plan, run.record.run_id))
        return f"pod {next(pod.name for pod in pods if rank in pod.ranks)}"

    def execute(self, run: Run, events: Events) -> Outcome:
        secrets = secret_env.resolve(secret_env.plan_sources(run.plan.artifacts))
        # `launcher resume RUN` is given no cluster options: a later attempt reaches the first one's cluster.
        target = self.target if self.target != Target() else Target.load(attempts.top_of(run.dir))
        stage_resume(run.dir, run.record, target)
        with sigterm_as_interrupt():
            run.record, problems = execute(run.plan, run.dir, run.record, events.console, target, self.replace,
                                           self.pending_timeout, secrets)
        events.info("gathered; verifying ...")
        return Outcome([Problem(p) for p in problems], gather.failed_rank_tail(run.dir, run.record))

    def status(self, run: Run) -> Status:
        return Status(*status(run.plan, run.dir, run.record))

    def logs(self, run: Run, ranks: list[int], follow: bool, prefix: bool, echo: Echo) -> list[Problem]:
        return [Problem(p) for p in logs(run.plan, run.dir, run.record, ranks, follow, prefix, echo)]

    def gather(self, run: Run) -> list[Problem]:
        return [Problem(p, fatal=True) for p in gather_again(run.plan, run.dir, run.record)]

    def down(self, run: Run, purge: bool) -> str:
        problems = down(run.plan, run.dir, run.record)
        if problems:
            raise LauncherError("; ".join(problems))
        return f"run {run.record.run_id}: every object with label launcher/run-id={run.record.run_id} is deleted"
