"""Golden files: every rendered artifact of the example jobs, compared whole.

Regenerate on purpose with:  pytest tests/test_golden.py --update-golden
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import EXAMPLES, require_tool

from launcher.plan import ENTRYPOINT_PATH, PLAN_FILE, build_plan
from launcher.spec import load_job

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "tiny-lora-local": "tiny-lora-local.yaml",
    "llama2-7b-lora-1x8-ranktable": "llama2-7b-lora-1x8-ranktable.yaml",
    "qwen1_5-7b-full-2x8-msrun": "qwen1_5-7b-full-2x8-msrun.yaml",
    "qwen1_5-7b-full-2x8-ranktable": "qwen1_5-7b-full-2x8-ranktable.yaml",
    "qwen1_5-7b-lora-1x8-ssh": "qwen1_5-7b-lora-1x8-ssh.yaml",
    "baichuan2-7b-lora-4dev-docker": "baichuan2-7b-lora-4dev-docker.yaml",
    "tiny-lora-ssh": "tiny-lora-ssh.yaml",
    "llama2-7b-lora-1x8-k8s": "llama2-7b-lora-1x8-k8s.yaml",
    "qwen1_5-7b-full-2x8-k8s-volcano": "qwen1_5-7b-full-2x8-k8s-volcano.yaml",
    "qwen1_5-7b-full-2x8-k8s-vcjob": "qwen1_5-7b-full-2x8-k8s-vcjob.yaml",
    "qwen1_5-7b-full-2x8-ascendjob": "qwen1_5-7b-full-2x8-ascendjob.yaml",
    "tiny-lora-k8s": "tiny-lora-k8s.yaml",
    "llama2-7b-lora-alpaca-msrun-autotrans": "llama2-7b-lora-alpaca-msrun-autotrans.yaml",
}


def rendered(case: str) -> dict[str, str]:
    plan = build_plan(load_job(EXAMPLES / CASES[case]))
    return {**plan.artifacts, PLAN_FILE: plan.to_json()}


def test_entrypoint_is_shipped_verbatim():
    # Kept out of the golden folders: it is the package's own file, copied as is.
    source = Path(__file__).parent.parent / "launcher" / "entrypoints" / "finetune.py"
    for case in CASES:
        assert rendered(case)[ENTRYPOINT_PATH] == source.read_text()


@pytest.mark.parametrize("case", CASES)
def test_matches_golden(case, request):
    files = rendered(case)
    files.pop(ENTRYPOINT_PATH)
    folder = GOLDEN / case
    if request.config.getoption("--update-golden"):
        shutil.rmtree(folder, ignore_errors=True)
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)
    on_disk = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}
    assert sorted(on_disk) == sorted(files), "the set of artifacts changed; rerun with --update-golden if meant"
    for rel, text in files.items():
        assert text == on_disk[rel], f"{case}/{rel} differs from the golden file"


@pytest.mark.parametrize("case", CASES)
def test_artifacts_are_well_formed(case, tmp_path):
    shellcheck = require_tool("shellcheck")
    files = rendered(case)
    scripts = []
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if rel.endswith(".json"):
            json.loads(text)
        elif rel.endswith((".yaml", ".yml")):
            assert isinstance(yaml.safe_load(text), dict)
        elif rel.endswith((".sh", ".env")):
            scripts.append(path)
        elif rel.endswith(".py"):
            compile(text, rel, "exec")
    assert any(p.suffix == ".sh" for p in scripts)
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        result = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(script)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}:\n{result.stdout}"
