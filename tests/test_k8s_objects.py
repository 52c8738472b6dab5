"""The rendered objects made into one run's objects (launcher/backends/k8s_objects.py)."""

import pytest

from conftest import EXAMPLES
from launcher.backends.k8s.objects import run_objects, set_owner
from launcher.errors import ConfigError
from launcher.k8s_manifests import OWNER_UID
from launcher.plan import build_plan
from launcher.spec import load_job

RUN = "tiny-lora-k8s-20260101-120000"


def test_names_labels_and_references_follow_the_run():
    objects = run_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")), RUN, namespace="train")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ConfigMap", f"{RUN}-plan"), ("Service", f"{RUN}-sched"), ("Pod", f"{RUN}-rank-0"), ("Pod", f"{RUN}-rank-1")]
    assert {o["metadata"]["namespace"] for o in objects} == {"train"}
    assert {o["metadata"]["labels"]["launcher/run-id"] for o in objects} == {RUN}
    assert objects[1]["spec"]["selector"]["launcher/run-id"] == RUN
    for pod in objects[2:]:
        assert pod["metadata"]["ownerReferences"][0]["name"] == f"{RUN}-plan"
        assert next(v for v in pod["spec"]["volumes"] if v["name"] == "plan")["configMap"]["name"] == f"{RUN}-plan"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MS_SCHED_HOST"] == f"{RUN}-sched.train.svc"
        set_owner(pod, "1234")
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "1234"
    # The plan itself is not changed: another run starts from the same objects.
    again = run_objects(build_plan(load_job(EXAMPLES / "tiny-lora-k8s.yaml")), RUN)
    assert again[2]["metadata"]["ownerReferences"][0]["uid"] == OWNER_UID


def test_only_kind_pods_is_started():
    plan = build_plan(load_job(EXAMPLES / "qwen1_5-7b-full-2x8-k8s-vcjob.yaml"))
    with pytest.raises(ConfigError, match="starts `kind: pods` jobs only"):
        run_objects(plan, "qwen-20260101-120000")
