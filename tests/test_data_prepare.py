"""`launcher data prepare`: formats, the chat template and its label mask, bad rows, the cache.

Regenerate the golden records on purpose with:  pytest tests/test_data_prepare.py --update-golden
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import EXAMPLES, REPO, assert_lora_checkpoints, free_port, only_run, run_launcher

from launcher.data import prepare as data_prepare
from launcher.data import mindrecord as dataset
from launcher.data.mindrecord import mindrecord_files
from launcher.data.prepare import prepare
from launcher.data.tokenization import IGNORE_INDEX, SYSTEM_PROMPT, TEMPLATES, encode_rows
from launcher.data.tokenizer import load_tokenizer

GOLDEN = REPO / "tests" / "golden" / "data_prepare"

ROWS = {
    "alpaca": [
        {"instruction": "Name the file that lists the ranks.", "input": "", "output": "The rank table."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    ],
    "belle": [
        {"instruction": "Which port does the scheduler use?", "input": "", "output": "The master port."},
    ],
    "novelset": [
        {"Instruction": "Write the rest of the story.", "Input": "Someone has to pick a port", "Response": "and check it."},
    ],
    "conversation": [
        {"id": "1", "conversations": [
            {"from": "human", "value": "Where do checkpoints land?"},
            {"from": "assistant", "value": "In one folder per rank."},
            {"from": "human", "value": "And the logs?"},
            {"from": "gpt", "value": "Each rank writes its own log."},
        ]},
    ],
}
# BELLE school_math is JSON lines; alpaca is a JSON array; the others are JSON lines.
LAYOUT = {"alpaca": "array", "belle": "lines", "novelset": "lines", "conversation": "lines"}


def write_rows(path: Path, rows: list, layout: str) -> Path:
    if layout == "array":
        path.write_text(json.dumps(rows, indent=2) + "\n")
    else:
        path.write_text("".join(json.dumps(r) + "\n" if isinstance(r, dict) else r + "\n" for r in rows))
    return path


def read_records(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    import mindspore.dataset as ds

    files = [str(f) for f in mindrecord_files(path)]
    data = ds.MindDataset(files, columns_list=["input_ids", "labels"], shuffle=False)
    return [(r["input_ids"], r["labels"]) for r in data.create_dict_iterator(output_numpy=True)]


def spans(labels: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges of learned (unmasked) labels."""
    learned = np.concatenate([[False], labels != IGNORE_INDEX, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(learned))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def marked(tokenizer, ids) -> str:
    """Decoded text with each end-of-sequence token shown as <eos> (sentencepiece drops it)."""
    pieces, start = [], 0
    for at in [*np.flatnonzero(ids == tokenizer.eos), len(ids)]:
        pieces.append(tokenizer.decode(ids[start:at]))
        start = at + 1
    return "<eos>".join(pieces)


def describe(path: Path, tokenizer) -> str:
    lines = []
    for n, (ids, labels) in enumerate(read_records(path)):
        learned = spans(labels)
        used = len(ids) - int(np.argmax((ids[::-1] != tokenizer.pad)))  # without the trailing padding
        used = max(used, learned[-1][1])  # Qwen pads with its EOS: keep the last answer's
        lines.append(f"record {n}: {len(ids)} tokens, {used} before padding, learned spans {learned}")
        lines.append(f"  text: {marked(tokenizer, ids[:used])!r}")
        for a, b in learned:
            lines.append(f"  learned: {marked(tokenizer, labels[a:b])!r}")
    return "\n".join(lines) + "\n"


CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as SmolLM2's
CHATML_CORPUS = ["You are a helpful assistant.", "Where do checkpoints land?", "In one folder per rank.",
                 "And the logs?", "Each rank writes its own log.", "system", "user", "assistant"]


def build_chatml_tokenizer(directory: Path, **config) -> Path:
    """A Hugging Face tokenizer directory in the shape of SmolLM2's: byte-level BPE in tokenizer.json,
    trained here on few enough words that each one is a single token, and a tokenizer_config.json with
    eos and pad <|im_end|>, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=CHATML_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CHATML_CORPUS * 3, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    settings = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    return directory


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> Path:
    return build_chatml_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


def check_golden(name: str, text: str, request) -> None:
    path = GOLDEN / name
    if request.config.getoption("--update-golden"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} is missing; run with --update-golden"
    assert text == path.read_text()


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_each_format_gives_its_golden_records(tmp_path, tiny_sp_tokenizer, fmt, request):
    source = write_rows(tmp_path / f"{fmt}.json", ROWS[fmt], LAYOUT[fmt])
    out = tmp_path / "out"
    report = prepare(source, fmt, tiny_sp_tokenizer, out, 257)
    assert (report.written, report.skipped, report.truncated) == (len(ROWS[fmt]), [], 0)
    check_golden(f"{fmt}-sp.txt", describe(out, load_tokenizer(tiny_sp_tokenizer)), request)


def test_byte_level_bpe_tokenizer_gives_its_golden_records(tmp_path, tiny_bpe_tokenizer, request):
    source = write_rows(tmp_path / "alpaca.json", ROWS["alpaca"], "array")
    out = tmp_path / "out"
    assert prepare(source, "alpaca", tiny_bpe_tokenizer, out, 400).written == 2
    tokenizer = load_tokenizer(tiny_bpe_tokenizer)
    assert tokenizer.bos is None and tokenizer.eos == tokenizer.pad  # Qwen: <|endoftext|> ends and pads
    ids, labels = read_records(out)[0]
    assert ids[0] != tokenizer.eos  # no BOS for byte-level BPE
    check_golden("alpaca-bpe.txt", describe(out, tokenizer), request)


def test_label_mask_starts_at_the_answer_and_ends_with_eos(tiny_sp_tokenizer):
    """A hand-written conversation: every boundary of the mask at its exact index."""
    tok = load_tokenizer(tiny_sp_tokenizer)
    question, answer = "Where do checkpoints land?", "In one folder per rank."
    prompt_ids = tok.sp.encode(f"{SYSTEM_PROMPT} USER: {question} ASSISTANT:")
    answer_ids = tok.sp.encode(answer)  # its "▁" is the space after "ASSISTANT:"
    ids, labels, truncated, empty = encode_rows(tok, [[(question, answer)]], 128)
    ids, labels = ids[0], labels[0]
    first = 1 + len(prompt_ids)  # BOS, then the masked prompt
    eos_at = first + len(answer_ids)
    assert ids[0] == tok.bos and labels[0] == IGNORE_INDEX
    assert (labels[:first] == IGNORE_INDEX).all()
    assert labels[first] == answer_ids[0] != IGNORE_INDEX
    assert labels[first:eos_at].tolist() == answer_ids == ids[first:eos_at].tolist()
    assert ids[eos_at] == labels[eos_at] == tok.eos
    assert (labels[eos_at + 1:] == IGNORE_INDEX).all() and (ids[eos_at + 1:] == tok.pad).all()
    assert tok.decode(ids[:eos_at]) == f"{SYSTEM_PROMPT} USER: {question} ASSISTANT: {answer}"
    assert (truncated, empty) == ([False], [False])


def test_a_tokenizer_json_directory_loads_its_config(tmp_path, chatml_tokenizer, tiny_bpe_tokenizer):
    tok = load_tokenizer(chatml_tokenizer)
    assert (tok.kind, tok.bos, tok.eos, tok.pad) == ("tokenizer.json", None, 2, 2)
    assert [tok.special_id(s) for s in CHATML_SPECIALS] == [0, 1, 2]
    assert tok.encode_batch(["<|im_start|>user\n"]) == [[1, tok.tok.token_to_id("user"), tok.tok.token_to_id("Ċ")]]
    # {"content": ...} objects, pad left out (it is then the EOS), and a BOS only with add_bos_token.
    other = build_chatml_tokenizer(tmp_path / "other", eos_token={"content": "<|endoftext|>", "special": True},
                                   pad_token=None, bos_token={"content": "<|im_start|>"}, add_bos_token=True)
    tok = load_tokenizer(other)
    assert (tok.bos, tok.eos, tok.pad) == (1, 0, 0)
    # tokenizer.json is read in preference to vocab.json + merges.txt beside it.
    for name in ("vocab.json", "merges.txt"):
        (other / name).write_bytes((tiny_bpe_tokenizer / name).read_bytes())
    assert load_tokenizer(other).kind == "tokenizer.json"


@pytest.mark.parametrize("config, message", [
    (None, "has tokenizer.json but no tokenizer_config.json"),
    ({"eos_token": None}, "names no eos_token"),
    ({"eos_token": "</s>"}, "eos_token '</s>' is not in tokenizer.json"),
    ({"add_bos_token": True}, "add_bos_token is true but no bos_token is named"),
])
def test_a_tokenizer_json_directory_with_a_bad_config_is_refused(tmp_path, config, message):
    from launcher.errors import ConfigError

    path = build_chatml_tokenizer(tmp_path / "tok", **(config or {}))
    if config is None:
        (path / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(path)


def chatml_pieces(tok, pieces: list[str]) -> list[int]:
    ids = [tok.tok.token_to_id(p) for p in pieces]
    assert None not in ids, [p for p, i in zip(pieces, ids) if i is None]
    return ids


# A 2-turn conversation in ChatML, written out by hand as byte-level BPE pieces ("Ċ" is "\n", "Ġ" a
# space) from the layout: the system message, then per turn the user message and the assistant's.
# True marks what is learned: each answer and its <|im_end|>, nothing else.
CHATML_TURNS = [("Where do checkpoints land?", "In one folder per rank."), ("And the logs?", "Each rank writes its own log.")]
CHATML_EXPECTED = [
    *[(p, False) for p in ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".",
                           "<|im_end|>", "Ċ",
                           "<|im_start|>", "user", "Ċ", "Where", "Ġdo", "Ġcheckpoints", "Ġland", "?", "<|im_end|>", "Ċ",
                           "<|im_start|>", "assistant", "Ċ"]],
    *[(p, True) for p in ["In", "Ġone", "Ġfolder", "Ġper", "Ġrank", ".", "<|im_end|>"]],
    *[(p, False) for p in ["Ċ", "<|im_start|>", "user", "Ċ", "And", "Ġthe", "Ġlogs", "?", "<|im_end|>", "Ċ",
                           "<|im_start|>", "assistant", "Ċ"]],
    *[(p, True) for p in ["Each", "Ġrank", "Ġwrites", "Ġits", "Ġown", "Ġlog", ".", "<|im_end|>"]],
    ("Ċ", False),
]


def test_chatml_record_of_two_turns_is_the_hand_written_one(chatml_tokenizer):
    tok = load_tokenizer(chatml_tokenizer)
    expected = chatml_pieces(tok, [p for p, _ in CHATML_EXPECTED])
    learned = np.array([learn for _, learn in CHATML_EXPECTED])
    length = len(expected) + 5
    ids, labels, truncated, empty = encode_rows(tok, [CHATML_TURNS], length, TEMPLATES["chatml"])
    assert ids[0].tolist() == expected + [tok.pad] * 5  # no BOS: the tokenizer asks for none
    assert labels[0].tolist() == np.where(learned, expected, IGNORE_INDEX).tolist() + [IGNORE_INDEX] * 5
    assert (truncated, empty) == ([False], [False])
    assert tok.decode(ids[0][:len(expected)]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhere do checkpoints land?<|im_end|>\n<|im_start|>assistant\nIn one folder per rank.<|im_end|>\n"
        "<|im_start|>user\nAnd the logs?<|im_end|>\n<|im_start|>assistant\nEach rank writes its own log.<|im_end|>\n")


def test_chatml_learns_neither_the_header_nor_the_newline(chatml_tokenizer):
    """Every learned span starts right after "<|im_start|>assistant\n" and ends with its <|im_end|>; the
    "\n" after that <|im_end|> and the header's tokens are masked."""
    tok = load_tokenizer(chatml_tokenizer)
    ids, labels, _, _ = encode_rows(tok, [CHATML_TURNS], 80, TEMPLATES["chatml"])
    ids, labels = ids[0].tolist(), labels[0]
    header = chatml_pieces(tok, ["<|im_start|>", "assistant", "Ċ"])
    newline = header[2]
    found = spans(labels)
    assert len(found) == 2
    for start, end in found:
        assert ids[start - 3:start] == header and (labels[start - 3:start] == IGNORE_INDEX).all()
        assert ids[end - 1] == labels[end - 1] == 2  # <|im_end|> learned
        assert ids[end] == newline and labels[end] == IGNORE_INDEX
    assert (labels != IGNORE_INDEX).sum() == 7 + 8


def test_chatml_needs_its_special_tokens(tmp_path, tiny_sp_tokenizer, tiny_bpe_tokenizer):
    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    result = run_launcher("data", "prepare", job_file(tmp_path, source, tiny_sp_tokenizer, template="chatml"),
                          cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "data.template: chatml needs <|im_start|> and <|im_end|> as single special tokens" in result.stderr
    # Qwen's vocab.json + merges.txt get them (after the vocabulary, as Qwen1.5's ids 151643..).
    tok = load_tokenizer(tiny_bpe_tokenizer)
    assert [tok.special_id(s) for s in CHATML_SPECIALS] == [400, 401, 402]
    TEMPLATES["chatml"].check(tok)


def test_chatml_job_prepares_and_keys_its_cache_apart(tmp_path, chatml_tokenizer):
    from launcher.data import cache
    from launcher.spec import load_job

    source = write_rows(tmp_path / "rows.jsonl", ROWS["conversation"], "lines")
    job = job_file(tmp_path, source, chatml_tokenizer, format="conversation", template="chatml", cache_dir="cache")
    result = run_launcher("data", "prepare", job, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [made] = (tmp_path / "cache").iterdir()
    [(ids, labels)] = read_records(made)
    tok = load_tokenizer(chatml_tokenizer)
    expected = chatml_pieces(tok, [p for p, _ in CHATML_EXPECTED])
    assert ids[:len(expected)].tolist() == expected and len(ids) == 257
    assert b"chatml-1 template" in (made / "part-00000.mindrecord").read_bytes()
    spec = load_job(job)
    chatml_key = cache.content_hash(spec.data, 257)
    vicuna = spec.data.model_copy(update={"template": "vicuna"})
    assert cache.content_hash(vicuna, 257) != chatml_key
    # The tokenizer's config is part of the key: another pad token is another dataset.
    config = chatml_tokenizer / "tokenizer_config.json"
    before = config.read_text()
    try:
        config.write_text(before.replace('"pad_token": "<|im_end|>"', '"pad_token": "<|endoftext|>"'))
        assert cache.content_hash(spec.data, 257) != chatml_key
    finally:
        config.write_text(before)


def test_vicuna_cache_key_is_unchanged(tmp_path, tiny_sp_tokenizer):
    """The key of a vicuna dataset is computed as before data.template existed, so prepared data is reused."""
    import hashlib

    from launcher.data import cache
    from launcher.spec import load_job

    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    data = load_job(job_file(tmp_path, source, tiny_sp_tokenizer)).data
    assert data.template == "vicuna"
    digest = hashlib.sha256(json.dumps({"format": "alpaca", "length": 257, "template": "vicuna_v1.1-1"}).encode())
    for path in (source, tiny_sp_tokenizer):
        digest.update(f"\0{path.name}\0".encode() + path.read_bytes())
    assert cache.content_hash(data, 257) == digest.hexdigest()


def test_the_run_records_the_template(tmp_path, chatml_tokenizer):
    from launcher.data import cache
    from launcher.spec import load_job

    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    job = load_job(job_file(tmp_path, source, chatml_tokenizer, template="chatml"))
    cache.record_run_data(job, tmp_path / "made", tmp_path)
    record = json.loads((tmp_path / "data.json").read_text())
    assert (record["template"], record["tokenizer"]) == ("chatml", str(chatml_tokenizer))


def test_truncation_is_counted_and_keeps_the_mask(tmp_path, tiny_sp_tokenizer):
    long_answer = "Someone has to write that down in a rank table, in the right order. " * 4
    rows = [{"instruction": "Say it.", "input": "", "output": long_answer},
            {"instruction": "Short.", "input": "", "output": "Yes."}]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    tok = load_tokenizer(tiny_sp_tokenizer)
    full = len(encode_rows(tok, [[(data_prepare.PROMPT_NO_INPUT.format(instruction="Say it."), long_answer)]],
                           1000)[0][0].nonzero()[0])
    length = full - 20
    report = prepare(source, "alpaca", tiny_sp_tokenizer, tmp_path / "out", length)
    assert (report.written, report.truncated) == (2, 1)
    (ids, labels), _ = read_records(tmp_path / "out")
    assert len(ids) == length and ids[-1] != tok.pad and labels[-1] == ids[-1] != tok.eos


def test_bad_rows_are_skipped_and_reported_by_line(tmp_path, tiny_sp_tokenizer):
    rows = [
        {"instruction": "Good one.", "input": "", "output": "Fine."},         # line 1
        {"instruction": "No answer.", "input": ""},                           # line 2: missing output
        {"instruction": "Empty answer.", "input": "", "output": "  "},        # line 3
        "{not json",                                                          # line 4
        "",                                                                   # line 5: blank, ignored
        {"instruction": "Good two.", "input": "x", "output": "Also fine."},   # line 6
    ]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    out = tmp_path / "out"
    result = run_launcher("data", "prepare", job_file(tmp_path, source, tiny_sp_tokenizer), "-o", out,
                          "--workers", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 records" in result.stdout and "skipped 3; truncated 0" in result.stdout
    assert ("line 2: missing key 'output', line 3: empty 'output', line 4: not JSON" in result.stderr), result.stderr
    assert len(read_records(out)) == 2


def test_strict_makes_a_bad_row_an_error_and_writes_nothing(tmp_path, tiny_sp_tokenizer):
    rows = [{"instruction": "Good.", "input": "", "output": "Fine."}] * 300 + [{"instruction": "Bad."}]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    out = tmp_path / "out"
    result = run_launcher("data", "prepare", job_file(tmp_path, source, tiny_sp_tokenizer), "-o", out,
                          "--strict", cwd=tmp_path)
    assert result.returncode == 2
    assert "line 301: missing key 'output'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "rows.jsonl"]


def test_an_existing_output_is_kept_without_force(tmp_path, tiny_sp_tokenizer):
    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    out = tmp_path / "out"
    prepare(source, "alpaca", tiny_sp_tokenizer, out, 257)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    job = job_file(tmp_path, source, tiny_sp_tokenizer)
    result = run_launcher("data", "prepare", job, "-o", out, cwd=tmp_path)
    assert result.returncode == 2 and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_rows(source, ROWS["alpaca"][:1], "array")
    result = run_launcher("data", "prepare", job, "-o", out, "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_records(out)) == 1
    # Neither run left a temporary folder beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out", "rows.json"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, tiny_sp_tokenizer):
    source = write_rows(tmp_path / "rows.jsonl", [{"instruction": "only bad"}], "lines")
    with pytest.raises(Exception, match="no usable rows"):
        prepare(source, "alpaca", tiny_sp_tokenizer, tmp_path / "out", 257)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_json_array_is_streamed_with_line_numbers(tmp_path, monkeypatch, tiny_sp_tokenizer):
    """Reads smaller than one element: the stream still yields every element and its line."""
    monkeypatch.setattr(data_prepare, "READ_BYTES", 64)
    rows = [{"instruction": f"Row {i}, a long enough instruction to span reads.", "input": "", "output": str(i)}
            for i in range(20)]
    source = write_rows(tmp_path / "rows.json", rows, "array")
    got = list(data_prepare.read_rows(source))
    assert [row for _, row in got] == rows
    text = source.read_text().splitlines()
    assert all(text[line - 1].strip() == "{" for line, _ in got)


def test_workers_write_the_same_records_as_one_process(tmp_path, tiny_sp_tokenizer):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i % 7 + 1)))}
            for i in range(700)]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    one = prepare(source, "alpaca", tiny_sp_tokenizer, tmp_path / "one", 257, workers=1)
    two = prepare(source, "alpaca", tiny_sp_tokenizer, tmp_path / "two", 257, workers=2)
    assert one.written == two.written == 700
    a, b = read_records(tmp_path / "one"), read_records(tmp_path / "two")
    assert all((x[0] == y[0]).all() and (x[1] == y[1]).all() for x, y in zip(a, b))


def test_a_large_dataset_is_written_in_parts(tmp_path, monkeypatch, tiny_sp_tokenizer):
    """MindRecord holds a file's index in memory until commit: the records go to files of a bounded size."""
    monkeypatch.setattr(dataset, "ROWS_PER_FILE", 300)
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": str(i)} for i in range(700)]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    assert prepare(source, "alpaca", tiny_sp_tokenizer, tmp_path / "out", 257).written == 700
    parts = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert parts == [f"part-0000{i}.mindrecord{db}" for i in range(3) for db in ("", ".db")]
    assert [len(read_records(tmp_path / "out" / f"part-0000{i}.mindrecord")) for i in range(3)] == [300, 300, 100]
    tokenizer = load_tokenizer(tiny_sp_tokenizer)
    answers = [tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
               for ids, labels in read_records(tmp_path / "out")]
    assert [a.split("<")[0].strip() for a in answers][:3] == ["0", "1", "2"] and len(answers) == 700


def job_file(tmp_path: Path, rows: Path, tokenizer_path: Path, **data) -> Path:
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    del job["dataset"]
    job["data"] = {"source": str(rows), "format": "alpaca", "tokenizer": str(tokenizer_path), "seq_length": 256,
                   "workers": 1, **data}
    job["cluster"]["master_port"] = free_port()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_prepare_reuses_the_cache_until_an_input_changes(tmp_path, tiny_sp_tokenizer):
    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    job = job_file(tmp_path, source, tiny_sp_tokenizer, cache_dir="cache")
    first = run_launcher("data", "prepare", job, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [made] = (tmp_path / "cache").iterdir()
    assert made.name.startswith("tiny-lora-") and len(made.name) == len("tiny-lora-") + 12
    stamp = made.stat().st_mtime_ns
    again = run_launcher("data", "prepare", job, cwd=tmp_path)
    assert again.returncode == 0 and "cached" in again.stdout
    assert made.stat().st_mtime_ns == stamp
    write_rows(source, ROWS["alpaca"][:1], "array")  # a changed source is a new dataset
    assert run_launcher("data", "prepare", job, cwd=tmp_path).returncode == 0
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("change, message", [
    ({"source": "missing.json"}, "data.source: "),
    ({"format": "alpacca"}, "data.format: Input should be 'alpaca', 'belle', 'novelset' or 'conversation'; "
                            "did you mean 'alpaca'?"),
    ({"tokenizer": "nowhere"}, "data.tokenizer: "),
    ({"template": "chatmll"}, "data.template: Input should be 'vicuna' or 'chatml'; did you mean 'chatml'?"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_sp_tokenizer, change, message):
    source = write_rows(tmp_path / "rows.json", ROWS["alpaca"], "array")
    job = job_file(tmp_path, source, tiny_sp_tokenizer, **change)
    result = run_launcher("data", "prepare", job, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_job_needs_a_dataset_path_or_a_data_section(tmp_path):
    job = yaml.safe_load((EXAMPLES / "tiny-lora-local.yaml").read_text())
    del job["dataset"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = run_launcher("render", tmp_path / "job.yaml", "-o", tmp_path / "r")
    assert result.returncode == 2 and "dataset.path: is required" in result.stderr


@pytest.mark.e2e
def test_up_prepares_the_data_section_and_trains_on_it(tmp_path, tiny_sp_tokenizer):
    """Rows built from the shipped corpus, tokenized with the sentencepiece model, then a real LoRA run."""
    corpus = (REPO / "configs" / "data" / "tiny_corpus.txt").read_text().split(". ")
    rows = [{"id": str(i), "conversations": [
        {"from": "human", "value": "Continue: " + " ".join(corpus[i % len(corpus)].split()[:6])},
        {"from": "assistant", "value": " ".join(corpus[i % len(corpus)].split()[6:20]) or "Done."}]}
        for i in range(64)]
    source = write_rows(tmp_path / "rows.jsonl", rows, "lines")
    job = job_file(tmp_path, source, tiny_sp_tokenizer, format="conversation", workers=2)
    data = yaml.safe_load(job.read_text())
    del data["data"]["seq_length"]  # the model's, from the override below
    data["mindformers"] = {"overrides": {"model.model_config.seq_length": 160}}
    job.write_text(yaml.safe_dump(data))
    result = run_launcher("up", job, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wrote 64 records" in result.stdout
    run_dir = only_run(tmp_path)
    assert_lora_checkpoints(run_dir, world=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["state"] == "succeeded" and all(r["steps"] > 0 for r in summary["ranks"].values())
    [made] = (tmp_path / "data" / "cache").iterdir()
    ids, labels = read_records(made)[0]
    assert len(ids) == 161
    record = json.loads((run_dir / "data.json").read_text())
    assert record["tokenizer"] == str(tiny_sp_tokenizer) and record["dataset"] == str(made)
