"""secret_env: the values are read only by `launcher up`, reach the ranks through their environment
(never a command line, never a file the launcher writes), and nothing the launcher leaves holds them.

The unit tests check the job checks, the errors, the rendered references and the SSH start protocol.
The end-to-end runs (one per backend) look from the outside while the ranks train: each rank's
/proc/PID/environ holds NAME=value, and no process's command line holds a value; after the run no
file of the run directory, of `launcher render`, of the nodes' work directories or (Kubernetes) of
any object the API held, bar the Secret's own data, holds a value, raw or base64.
"""

import base64
import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml
from conftest import EXAMPLES, LAUNCHER, free_port, only_run, outside_processes, require_tool, run_launcher

from launcher import secret_env
from launcher.backends.k8s.objects import run_objects
from launcher.errors import ConfigError
from launcher.k8s_objects import OWNER_UID
from launcher.plan import NodeStep, build_plan
from launcher.render import render_template
from launcher.spec import parse_job

TOKEN_VAR = "LAUNCHER_TEST_SECRET_TOKEN"  # in the launcher's environment only, never in this process's


def example(name: str, **secret) -> dict:
    data = yaml.safe_load((EXAMPLES / name).read_text())
    data["secret_env"] = secret or {"HF_TOKEN": {"from_env": TOKEN_VAR}}
    return data


@pytest.fixture
def secrets(tmp_path):
    """Two distinctive values: HF_TOKEN from the launcher's environment, OBS_KEY from a file."""
    token, key = f"s3cr3t-{uuid.uuid4().hex}", f"s3cr3t-{uuid.uuid4().hex}"
    key_file = tmp_path / "keys" / "obs-key"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    return SimpleNamespace(
        values={"HF_TOKEN": token, "OBS_KEY": key},
        section={"HF_TOKEN": {"from_env": TOKEN_VAR}, "OBS_KEY": {"from_file": str(key_file)}},
        env={**os.environ, TOKEN_VAR: token},
    )


def forms(values: dict[str, str]) -> dict[bytes, str]:
    """Each value raw and in base64 (as a Secret's data holds it) -> what to call it in a failure."""
    out = {}
    for name, value in values.items():
        out[value.encode()] = f"{name} (raw)"
        out[base64.b64encode(value.encode())] = f"{name} (base64)"
    return out


def leaks_in_files(roots, values) -> list[str]:
    found = []
    for root in roots:
        for base, _dirs, files in os.walk(root):  # not following links: a pod's mounts link into each other
            for name in files:
                path = Path(base) / name
                if path.is_symlink():
                    continue
                data = path.read_bytes()
                found += [f"{path}: {what}" for form, what in forms(values).items() if form in data]
    return found


def leaks_in_text(text: str, values) -> list[str]:
    return [what for form, what in forms(values).items() if form in text.encode()]


def leaks_in_cmdlines(values) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        found += [f"pid {pid}: {what}" for form, what in forms(values).items() if form in cmdline]
    return found


def environ(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def watch_ranks(proc, run_id, roots, values, want: int, timeout: float = 300) -> None:
    """While the run goes: until `want` rank processes (MindSpore workers) were found in the process table
    with every NAME=value in their environment; every process's command line is scanned meanwhile."""
    checked: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(checked) < want:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"found {len(checked)} of {want} ranks"
        assert leaks_in_cmdlines(values) == []
        for line in outside_processes(run_id(), roots=roots) if run_id() else []:
            pid = int(line.split()[1])
            env = environ(pid)
            if "finetune.py" not in line or "msrun" in line or env is None or b"MS_ROLE=MS_WORKER" not in env:
                continue
            missing = [name for name, value in values.items() if f"{name}={value}".encode() not in env]
            assert not missing, f"{line}: no {missing} in its environment"
            checked.add(pid)
        time.sleep(0.5)
    assert leaks_in_cmdlines(values) == []


def up_watching_ranks(tmp_path, argv, env, roots, values) -> tuple[str, str]:
    """`launcher up ARGV...` in tmp_path, its ranks' environments and every command line checked while it
    runs (watch_ranks, two ranks); (stdout, stderr) once it ended with exit 0."""
    proc = subprocess.Popen([LAUNCHER, "up", *map(str, argv)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        watch_ranks(proc, lambda: started_run(tmp_path), roots, values, want=2)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out + err
    return out, err


def started_run(tmp_path):
    """The run id, once the launcher made its run directory."""
    runs = list((tmp_path / "runs").glob("*/run.json")) if (tmp_path / "runs").is_dir() else []
    return runs[0].parent.name if runs else None


def rendered_leaks(tmp_path, job, secrets) -> list[str]:
    """`launcher render` of the same job: it needs no value, and writes none."""
    result = run_launcher("render", job, "-o", tmp_path / "rendered", cwd=tmp_path, env=secrets.env)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "rendered" / "env" / "job.env").read_text()
    assert "Set at launch from secret_env, never written here: HF_TOKEN, OBS_KEY" in text
    return leaks_in_files([tmp_path / "rendered"], secrets.values) + leaks_in_text(result.stdout + result.stderr,
                                                                                    secrets.values)


# --- the job checks and the errors -------------------------------------------------------------


@pytest.mark.parametrize("change, expected", [
    ({"secret_env": {"WANDB_KEY": {"secret": "my-secret", "key": "k"}}},
     "secret_env.WANDB_KEY: a Kubernetes Secret reference needs backend: k8s; on local give the value"),
    ({"env": {"HF_TOKEN": "x"}, "secret_env": {"HF_TOKEN": {"from_env": "HF_TOKEN"}}},
     "secret_env.HF_TOKEN: HF_TOKEN is also set in env"),
])
def test_cross_field_problems(change, expected):
    data = {**example("tiny-lora-local.yaml"), **change}
    with pytest.raises(ConfigError, match=expected):
        parse_job(data)


def test_a_secret_ref_may_not_take_the_launchers_own_name():
    data = example("tiny-lora-k8s.yaml", WANDB_KEY={"secret": "tiny-lora-k8s-secret-env", "key": "k"})
    with pytest.raises(ConfigError, match="secret_env.WANDB_KEY: 'tiny-lora-k8s-secret-env' is the name of the Secret"):
        parse_job(data)


def write(tmp_path, data) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_one_line_error(result, tmp_path, expected):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("source, expected", [
    ({"from_env": TOKEN_VAR}, f"secret_env.HF_TOKEN: the variable {TOKEN_VAR} is not set in the launcher's env"),
    ({"from_file": "/nonexistent/obs-key"}, "secret_env.HF_TOKEN: cannot read /nonexistent/obs-key: no such file"),
    ({"from_file": "/"}, "secret_env.HF_TOKEN: cannot read /: Is a directory"),
])
def test_a_value_that_cannot_be_read_stops_up_before_anything_starts(tmp_path, tiny_dataset, source, expected):
    data = example("tiny-lora-local.yaml", HF_TOKEN=source)
    data["dataset"]["path"] = str(tiny_dataset)
    data["cluster"]["master_port"] = free_port()
    job = write(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VAR}
    assert_one_line_error(run_launcher("up", job, cwd=tmp_path, env=env), tmp_path, expected)
    # render reads no value; a rendered plan reads them when it is started
    rendered = run_launcher("render", job, "-o", tmp_path / "rendered", cwd=tmp_path, env=env)
    assert rendered.returncode == 0, rendered.stderr
    assert_one_line_error(run_launcher("up", tmp_path / "rendered", cwd=tmp_path, env=env), tmp_path, expected)


def test_values_are_read_from_the_environment_and_files(tmp_path, monkeypatch):
    (tmp_path / "key").write_text("line one\nline two\n\n")
    monkeypatch.setenv(TOKEN_VAR, " spaced $(not run) ")
    sources = parse_job(example("tiny-lora-k8s.yaml", A={"from_env": TOKEN_VAR}, B={"from_file": str(tmp_path / "key")},
                                C={"secret": "my-secret", "key": "k"})).secret_env
    assert secret_env.resolve(sources) == {"A": " spaced $(not run) ", "B": "line one\nline two\n"}  # one \n dropped


# --- what is rendered: names and references only -----------------------------------------------

K8S_SECRET_ENV = {"HF_TOKEN": {"from_env": "HF_TOKEN"}, "OBS_KEY": {"from_file": "~/.obs-key"},
                  "WANDB_KEY": {"secret": "my-secret", "key": "k"}}
# By hand from the Kubernetes API (kubernetes/api core/v1 types.go): EnvVar{name, valueFrom: EnvVarSource
# {secretKeyRef: SecretKeySelector{name, key}}}; the launcher's own Secret is named after the job.
EXPECTED_ENV = [
    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tiny-lora-k8s-secret-env", "key": "HF_TOKEN"}}},
    {"name": "OBS_KEY", "valueFrom": {"secretKeyRef": {"name": "tiny-lora-k8s-secret-env", "key": "OBS_KEY"}}},
    {"name": "WANDB_KEY", "valueFrom": {"secretKeyRef": {"name": "my-secret", "key": "k"}}},
]


def k8s_plan(**k8s):
    data = example("tiny-lora-k8s.yaml", **K8S_SECRET_ENV)
    data["cluster"]["k8s"].update(k8s)
    return build_plan(parse_job(data))


@pytest.mark.parametrize("pods", ["per-rank", "per-node"])
def test_every_container_gets_secret_key_refs(pods):
    plan = k8s_plan(pods=pods)
    specs = [yaml.safe_load(t) for p, t in plan.artifacts.items() if p.startswith("k8s/") and p.endswith(".yaml")]
    pods_ = [o for o in specs if o["kind"] == "Pod"]
    assert pods_ and not [o for o in specs if o["kind"] == "Secret"]  # the backend makes it for each run
    for pod in pods_:
        kubernetes_validate.validate(pod, "1.33.0", strict=True)
        for container in pod["spec"]["containers"]:
            assert [e for e in container["env"] if e["name"] in K8S_SECRET_ENV] == EXPECTED_ENV
    assert json.loads(plan.artifacts[secret_env.SOURCES_PATH]) == K8S_SECRET_ENV
    configmap = next(o for o in specs if o["kind"] == "ConfigMap")
    assert "env__secret_env.json" not in configmap["data"]  # the pods do not read it


def test_the_run_gets_its_own_secret_and_its_pods_point_to_it():
    run = "tiny-lora-k8s-20260101-120000"
    data = example("tiny-lora-k8s.yaml", **K8S_SECRET_ENV, OTHER={"secret": "tiny-lora-k8s-hf", "key": "t"})
    objects = run_objects(build_plan(parse_job(data)), run, secrets={"HF_TOKEN": "tok", "OBS_KEY": "key"})
    assert [(o["kind"], o["metadata"]["name"]) for o in objects][:3] == [
        ("ConfigMap", f"{run}-plan"), ("Secret", f"{run}-secret-env"), ("Service", f"{run}-sched")]
    secret = objects[1]
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    assert secret["type"] == "Opaque" and secret["immutable"] is True
    assert secret["data"] == {"HF_TOKEN": "dG9r", "OBS_KEY": "a2V5"}  # base64 of tok and key
    assert secret["metadata"]["labels"]["launcher/run-id"] == run
    assert secret["metadata"]["ownerReferences"][0]["name"] == f"{run}-plan"
    for pod in objects[3:]:
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0]["env"]
                if "secretKeyRef" in e.get("valueFrom", {})}
        # the launcher's own Secret follows the run; the user's Secrets keep their names
        assert refs == {"HF_TOKEN": f"{run}-secret-env", "OBS_KEY": f"{run}-secret-env", "WANDB_KEY": "my-secret",
                        "OTHER": "tiny-lora-k8s-hf"}
    # reached again (status, down), the run makes no Secret
    assert "Secret" not in {o["kind"] for o in run_objects(build_plan(parse_job(data)), run)}


def test_scripts_name_the_variables_and_pass_shellcheck(tmp_path):
    shellcheck = require_tool("shellcheck")
    data = yaml.safe_load((EXAMPLES / "baichuan2-7b-lora-4dev-docker.yaml").read_text())
    data["secret_env"] = {"HF_TOKEN": {"from_env": "HF_TOKEN"}}
    plan = build_plan(parse_job(data))
    docker = next(t for p, t in plan.artifacts.items() if p.endswith("docker-run.sh"))
    assert "  --env=HF_TOKEN \\\n" in docker  # docker takes the value from the script's environment
    start = render_template("ssh_start.sh.j2", run_id="r-1", job_name="j", node=plan.nodes[0], path="/usr/bin:/bin",
                            secret_names=["HF_TOKEN"])
    for name, text in (("docker-run.sh", docker), ("job.env", plan.artifacts["env/job.env"]), ("start.sh", start)):
        (tmp_path / name).write_text(text)
        result = subprocess.run([shellcheck, "--shell=bash", str(tmp_path / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}:\n{result.stdout}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_ssh_start_script_exports_what_arrives_on_stdin(tmp_path):
    """The SSH start protocol without sshd: start.sh reads NUL-ended NAME=value entries from stdin and the
    detached node script has them. Awkward values survive; the node's files hold none of them."""
    values = {"HF_TOKEN": f"s3cr3t-{uuid.uuid4().hex}", "ODD": " a 'b' \"c\" $(touch pwned) `x` =y\nline 2 "}
    step = NodeStep(index=0, host="h", node_rank=0, script="nodes/node-0/launch.sh", entry="nodes/node-0/launch.sh",
                    ranks=(0,))
    checks = "\n".join(f'[ "$(printf %s "${{{name}}}" | sha256sum | cut -d" " -f1)" = {sha256(value)} ]'
                       for name, value in values.items())
    (tmp_path / "plan" / "nodes" / "node-0").mkdir(parents=True)
    (tmp_path / "plan" / step.entry).write_text(f"set -eu\n{checks}\n")
    (tmp_path / "start.sh").write_text(render_template("ssh_start.sh.j2", run_id="r-1", job_name="j", node=step,
                                                       path=os.environ["PATH"], secret_names=list(values)))
    subprocess.run(["bash", str(tmp_path / "start.sh")], input=secret_env.stdin_payload(values), text=True,
                   check=True, timeout=30, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while not (tmp_path / "node.exit").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "node.exit").read_text() == "0\n", (tmp_path / "node.log").read_text()
    assert not (tmp_path / "pwned").exists()
    assert leaks_in_files([tmp_path], values) == []


# --- real runs, looked at from the outside -----------------------------------------------------


@pytest.mark.e2e
def test_local_ranks_get_the_values_and_nothing_keeps_them(tmp_path, tiny_dataset, secrets):
    from test_e2e_local import write_job

    job = write_job(tmp_path, tiny_dataset)
    job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "secret_env": secrets.section}))
    out, err = up_watching_ranks(tmp_path, [job], secrets.env, [tmp_path / "runs"], secrets.values)
    run_dir = only_run(tmp_path)
    assert (run_dir / "ranks" / "rank_1" / "checkpoint").is_dir()
    assert leaks_in_files([run_dir], secrets.values) == []
    assert leaks_in_text(out + err, secrets.values) == []
    assert rendered_leaks(tmp_path, job, secrets) == []


@pytest.fixture
def ssh_cluster(tmp_path):
    import sshcluster

    built = sshcluster.build_or_skip(tmp_path / "cluster", 2)
    yield built
    sshcluster.teardown(2, built)


@pytest.mark.e2e
def test_ssh_ranks_get_the_values_over_the_channel_and_no_node_keeps_them(tmp_path, ssh_cluster, tiny_dataset,
                                                                          secrets):
    import sshcluster
    from test_e2e_ssh import write_job

    job = write_job(tmp_path, ssh_cluster, tiny_dataset)
    job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "secret_env": secrets.section}))
    # The hosts' PID namespaces are children of this one: their ranks are in this /proc too.
    out, err = up_watching_ranks(tmp_path, [job], secrets.env, [sshcluster.WORKDIR], secrets.values)
    run_dir = only_run(tmp_path)
    # Each host's own disk, whole: its work directory, home and /tmp.
    disks = [host.path(where) for host in ssh_cluster.hosts for where in ("/srv", "/tmp")]
    disks += [p for host in ssh_cluster.hosts for p in host.path("/root").iterdir() if p.name != ".pyenv"]
    for host in ssh_cluster.hosts:
        start = (host.path(sshcluster.WORKDIR) / run_dir.name / "start.sh").read_text()
        assert "arrives on standard input" in start
    assert leaks_in_files([run_dir, *disks], secrets.values) == []
    assert leaks_in_text(out + err, secrets.values) == []
    assert rendered_leaks(tmp_path, job, secrets) == []


@pytest.mark.e2e
@pytest.mark.k8s
def test_k8s_pods_read_the_runs_secret_and_no_other_object_holds_the_values(tmp_path, tiny_dataset, secrets):
    import k8scluster
    from test_e2e_k8s import CLAIM, assert_nothing_left, launcher_env, write_job

    cluster = k8scluster.Cluster(tmp_path / "cluster")
    try:
        job = write_job(tmp_path, tiny_dataset)
        job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "secret_env": {
            **secrets.section, "WANDB_KEY": {"secret": "team-keys", "key": "wandb"}}}))
        wandb = f"s3cr3t-{uuid.uuid4().hex}"  # an existing Secret of the user's, read by the pods alone
        cluster.runner.core.create_namespaced_secret("default", {
            "metadata": {"name": "team-keys"}, "data": {"wandb": base64.b64encode(wandb.encode()).decode()}})
        env = {**launcher_env(cluster), TOKEN_VAR: secrets.values["HF_TOKEN"]}
        values = {**secrets.values, "WANDB_KEY": wandb}
        out, err = up_watching_ranks(tmp_path, [job, "--pvc-dir", cluster.runner.pvc_dir(CLAIM)], env,
                                     [cluster.runner.root / "pods"], values)
        run_dir = only_run(tmp_path)
        assert_nothing_left(cluster, run_dir.name)  # the run's Secret is deleted with its other objects

        stored = cluster.stored()
        made = [o for plural, o in stored if plural == "secrets" and o["metadata"]["name"] != "team-keys"]
        assert [o["metadata"]["name"] for o in made] == [f"{run_dir.name}-secret-env"]
        assert {k: base64.b64decode(v).decode() for k, v in made[0]["data"].items()} == secrets.values
        owner = made[0]["metadata"]["ownerReferences"][0]
        assert owner["name"] == f"{run_dir.name}-plan" and owner["uid"] != OWNER_UID  # the ConfigMap's own uid
        for plural, obj in stored:
            text = json.dumps({k: v for k, v in obj.items() if not (plural == "secrets" and k == "data")})
            assert leaks_in_text(text, values) == [], f"{plural} {obj.get('metadata', {}).get('name')}"
        assert leaks_in_files([run_dir, cluster.runner.root], values) == []
        assert leaks_in_text(out + err, values) == []
        assert rendered_leaks(tmp_path, job, secrets) == []
    finally:
        cluster.stop()
