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
from launcher.errors import ConfigError, LauncherError

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


def find_tokenizer(run_dir: Path, given: str | None) -> Path:
    """--tokenizer, else the one the run's dataset was prepared with (recorded in data.json)."""
    if given:
        path = Path(given)
    else:
        record = run_dir / "data.json"
        if not record.is_file():
            raise ConfigError(f"{run_dir.name} does not record a tokenizer (no data: section); pass --tokenizer")
        path = Path(json.loads(record.read_text())["tokenizer"])
    if path.is_file() or (path / "tokenizer.model").is_file() or (path / "vocab.json").is_file():
        return path.resolve()
    raise ConfigError(f"tokenizer {path} is neither a tokenizer.model nor a directory with vocab.json and merges.txt")


def run_device(run_dir: Path) -> str:
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    return "cpu" if str(config.get("context", {}).get("device_target", "")).upper() == "CPU" else "ascend"


def predict(run_dir: Path, prompts: list[str], checkpoint: str | None, tokenizer: str | None,
            max_new_tokens: int, chat: bool = False, timeout: float = 1800) -> dict:
    """Generate for each prompt; returns {"outputs": [{"prompt", "text", "answer"}], "checkpoint", "use_past"}.

    chat: each prompt goes in as the user turn of the template `launcher data prepare` trains on, and
    "answer" is what the model wrote after "ASSISTANT:"; without it the prompt is continued as text.
    """
    if chat:
        from launcher.data.tokenization import chat_prompt

        prompts = [chat_prompt(p) for p in prompts]
    config = run_dir / RUN_CONFIG
    if not config.is_file():
        raise ConfigError(f"{run_dir} has no {RUN_CONFIG}; is it a run directory?")
    checkpoint_path = find_checkpoint(run_dir, checkpoint).resolve()
    tokenizer_path = find_tokenizer(run_dir, tokenizer)
    work = run_dir / "predict"
    work.mkdir(exist_ok=True)
    result = work / "result.json"
    result.unlink(missing_ok=True)
    request = {
        "config": str(config.resolve()),
        "checkpoint": str(checkpoint_path),
        "tokenizer": str(tokenizer_path),
        "prompts": prompts,
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
    answer = json.loads(result.read_text())
    for item in answer["outputs"]:
        text, prompt = item["text"], item["prompt"]
        item["answer"] = text[len(prompt):].strip() if text.startswith(prompt) else text
    result.write_text(json.dumps(answer, indent=2) + "\n")
    return answer
