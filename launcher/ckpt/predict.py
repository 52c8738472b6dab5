"""`launcher predict`: generate from a run's merged checkpoint, as a smoke test of the fine-tune.

The generation runs in its own process (entrypoints/predict.py) inside runs/<id>/predict/, where
MindFormers may write its logs; the launcher reads back a small JSON result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from launcher.ckpt.merge import MERGED_DIR, RUN_CONFIG, latest_checkpoint
from launcher.ckpt.lora import MERGED_LORA_DIR
from launcher.data.tokenization import get_template
from launcher.data.tokenizer import load_tokenizer
from launcher.errors import ConfigError, LauncherError
from launcher.runs import DATA_RECORD

# Folded LoRA first: it is the model people deploy. Then the merged checkpoint of the run.
CHECKPOINT_DIRS = (MERGED_LORA_DIR, MERGED_DIR)
ENTRYPOINT = Path(__file__).resolve().parent.parent / "entrypoints" / "predict.py"


def find_checkpoint(run_dir: Path, given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise ConfigError(f"--checkpoint: {path} does not exist")
        return path
    for name in CHECKPOINT_DIRS:
        found = latest_checkpoint(run_dir / name)
        if found is not None:
            return found
    raise ConfigError(
        f"{run_dir.name} has no merged checkpoint; run 'launcher ckpt merge {run_dir.name}' "
        "(and 'launcher ckpt merge-lora' for LoRA), or pass --checkpoint"
    )


def data_record(run_dir: Path) -> dict:
    """What the run's data: section prepared (data.json), or {} for a run without one."""
    record = run_dir / DATA_RECORD
    return json.loads(record.read_text()) if record.is_file() else {}


def find_tokenizer(run_dir: Path, given: str | None, record: dict) -> Path:
    """--tokenizer, else the one the run's dataset was prepared with."""
    if given:
        path = Path(given)
    elif "tokenizer" in record:
        path = Path(record["tokenizer"])
    else:
        raise ConfigError(f"{run_dir.name} does not record a tokenizer (no data: section); pass --tokenizer")
    return path.resolve()


def run_device(run_dir: Path) -> str:
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    return "cpu" if str(config.get("context", {}).get("device_target", "")).upper() == "CPU" else "ascend"


def predict(run_dir: Path, prompts: list[str], checkpoint: str | None, tokenizer: str | None,
            max_new_tokens: int, chat: bool = False, template: str | None = None, timeout: float = 1800) -> dict:
    """Generate for each prompt; returns {"outputs": [{"prompt", "text", "answer"}], "checkpoint", "use_past"}.

    chat: each prompt goes in as the user turn of the template (--template, else the one the run's data was
    prepared with, else vicuna), generation stops at the template's end token, and "answer" is what the
    model wrote after the prompt, without that token; without chat the prompt is continued as text.
    """
    if template and not chat:
        raise ConfigError("--template is the layout of --chat; add --chat")
    config = run_dir / RUN_CONFIG
    if not config.is_file():
        raise ConfigError(f"{run_dir} has no {RUN_CONFIG}; is it a run directory?")
    checkpoint_path = find_checkpoint(run_dir, checkpoint).resolve()
    record = data_record(run_dir)
    tokenizer_path = find_tokenizer(run_dir, tokenizer, record)
    tok = load_tokenizer(tokenizer_path, "--tokenizer" if tokenizer else f"{DATA_RECORD} tokenizer")
    stop = [tok.eos]
    if chat:
        layout = get_template(template or record.get("template", "vicuna"), "--template")
        layout.check(tok, "--template")
        prompts = [layout.prompt(p) for p in prompts]
        stop = list(dict.fromkeys([layout.end_id(tok), tok.eos]))  # a model may still end with its EOS
    work = run_dir / "predict"
    work.mkdir(exist_ok=True)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    request = {
        "config": str(config.resolve()),
        "checkpoint": str(checkpoint_path),
        "tokenizer": str(tokenizer_path),
        "prompts": prompts,
        "bos_id": tok.bos,
        "stop_ids": stop,
        "max_new_tokens": max_new_tokens,
        "device": run_device(run_dir),
        "result": str(result.resolve()),
    }
    (work / "request.json").write_text(json.dumps(request, indent=2) + "\n")
    log = work / "predict.log"
    with open(log, "w") as log_file:
        try:
            proc = subprocess.run([sys.executable, str(ENTRYPOINT), "request.json"], cwd=work,
                                  stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LauncherError(f"predict did not finish in {timeout:.0f} s; see {log}") from None
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise LauncherError(f"predict failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(result.read_text())
