"""`launcher data prepare`: instruction data -> conversations in a chat template -> a tokenized MindRecord.

Rows stream from the source (a JSON array or JSON lines, for every format) in chunks to a pool of
worker processes, each holding the tokenizer; the results come back in order and the main process
writes them to a MindRecord in batches. At most a few chunks are in flight, so memory does not grow
with the dataset; the output is a directory of MindRecord files of at most dataset.ROWS_PER_FILE records
(MindRecord's commit holds a file's index in memory). It appears only when it is whole.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from launcher.errors import ConfigError

CHUNK_ROWS = 256  # rows per task: large enough to amortize pickling, small enough to keep workers busy
# Chunks in flight per worker: enough to keep the workers busy while this process loads MindSpore
# (about a second) for the writer, few enough that memory stays flat (a chunk is about 2 MB of results).
IN_FLIGHT = 8
READ_BYTES = 1 << 20
SKIPPED_SHOWN = 20

# alpaca_converter.py (MindFormers, from Stanford alpaca's training script): the user turn of an
# instruction row, with and without its input.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# (instruction, input, output) keys per format; BELLE school_math uses alpaca's keys.
INSTRUCTION_KEYS = {
    "alpaca": ("instruction", "input", "output"),
    "belle": ("instruction", "input", "output"),
    "novelset": ("Instruction", "Input", "Response"),
}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class BadRow(ValueError):
    """A row that cannot become a training record; the message says why."""


def instruction_turns(row: dict, fmt: str) -> list[tuple[str, str]]:
    k_instruction, k_input, k_output = INSTRUCTION_KEYS[fmt]
    for key in (k_instruction, k_output):
        if key not in row:
            raise BadRow(f"missing key '{key}'")
        if not isinstance(row[key], str):
            raise BadRow(f"'{key}' is not a string")
    extra = row.get(k_input) or ""
    if not isinstance(extra, str):
        raise BadRow(f"'{k_input}' is not a string")
    if not row[k_output].strip():
        raise BadRow(f"empty '{k_output}'")
    if not row[k_instruction].strip():
        raise BadRow(f"empty '{k_instruction}'")
    template = PROMPT_INPUT if extra else PROMPT_NO_INPUT
    return [(template.format(instruction=row[k_instruction], input=extra), row[k_output])]


def conversation_turns(row: dict) -> list[tuple[str, str]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("missing key 'conversations' (a list of {from, value})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadRow(f"conversations[{i}] needs 'from' and 'value'")
        role = ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise BadRow(f"conversations[{i}]: unknown speaker '{turn['from']}' (human or assistant)")
        if not isinstance(turn["value"], str):
            raise BadRow(f"conversations[{i}]: 'value' is not a string")
        messages.append((role, turn["value"]))
    if messages[0][0] != "user":
        messages = messages[1:]  # as llama_preprocess.py: a conversation starts with the user
    if not messages or len(messages) % 2:
        raise BadRow("a conversation needs pairs of human and assistant turns")
    pairs = []
    for i in range(0, len(messages), 2):
        (r1, question), (r2, answer) = messages[i], messages[i + 1]
        if (r1, r2) != ("user", "assistant"):
            raise BadRow(f"conversations[{i}]: turns must alternate human, assistant")
        if not answer.strip():
            raise BadRow(f"conversations[{i + 1}]: empty assistant value")
        pairs.append((question, answer))
    return pairs


def row_turns(item, fmt: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of one row; `item` is a parsed row or one line of JSON lines."""
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except ValueError as exc:
            raise BadRow(f"not JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise BadRow("not a JSON object")
    return conversation_turns(item) if fmt == "conversation" else instruction_turns(item, fmt)


# --- reading -----------------------------------------------------------------------------------

_BETWEEN = re.compile(r"[\s,]*")


def read_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, row) of a JSON array file (parsed objects) or a JSON lines file (raw lines)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            yield from _json_array(f, path)
            return
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def _json_array(f, path: Path) -> Iterator[tuple[int, object]]:
    """Stream the elements of a top-level JSON array, never holding more than about one read of text."""
    decoder = json.JSONDecoder()
    buf = f.read(READ_BYTES)
    pos = buf.index("[") + 1
    line = 1 + buf.count("\n", 0, pos)
    eof = False
    while True:
        end = _BETWEEN.match(buf, pos).end()
        line += buf.count("\n", pos, end)
        pos = end
        if pos == len(buf) or not eof and len(buf) - pos < 64:
            if eof:
                raise ConfigError(f"{path}: line {line}: the JSON array is not closed with ']'")
            more = f.read(READ_BYTES)
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        if buf[pos] == "]":
            return
        try:
            row, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:
                raise ValueError("maybe cut")  # a number or string may go on in the next read
        except ValueError as exc:
            if eof:
                raise ConfigError(f"{path}: line {line}: the JSON array does not parse ({exc}); "
                                  "fix the file, or write one object per line (JSON lines)") from None
            more = f.read(max(READ_BYTES, len(buf)))  # an element longer than a read: read more
            buf, pos, eof = buf[pos:] + more, 0, not more
            continue
        yield line, row
        line += buf.count("\n", pos, end)
        pos = end
        if pos > READ_BYTES:
            buf, pos = buf[pos:], 0


def chunked(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- the worker side ---------------------------------------------------------------------------

_WORKER: dict = {}


def init_worker(tokenizer_path: str, fmt: str, length: int, template: str) -> None:
    from launcher.data.tokenization import get_template
    from launcher.data.tokenizer import load_tokenizer

    _WORKER.update(tokenizer=load_tokenizer(tokenizer_path), fmt=fmt, length=length, template=get_template(template))


def encode_chunk(chunk: list[tuple[int, object]]):
    """(input_ids [n, L], labels [n, L], truncated line numbers, [(line, reason)] of bad rows)."""
    from launcher.data.tokenization import encode_rows

    fmt, tokenizer, length = _WORKER["fmt"], _WORKER["tokenizer"], _WORKER["length"]
    good, turns, bad = [], [], []
    for number, item in chunk:
        try:
            turns.append(row_turns(item, fmt))
            good.append(number)
        except BadRow as exc:
            bad.append((number, str(exc)))
    ids, labels, truncated, empty = encode_rows(tokenizer, turns, length, _WORKER["template"])
    keep = [i for i, e in enumerate(empty) if not e]
    bad += [(good[i], f"the prompt alone is longer than {length} tokens; no answer token fits")
            for i, e in enumerate(empty) if e]
    if len(keep) < len(good):
        ids, labels = ids[keep], labels[keep]
    bad.sort()
    return ids, labels, [good[i] for i in keep if truncated[i]], bad


# --- the whole run -----------------------------------------------------------------------------


@dataclass
class Report:
    output: Path
    written: int = 0
    truncated: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False

    def skipped_lines(self) -> str:
        shown = ", ".join(f"line {n}: {why}" for n, why in self.skipped[:SKIPPED_SHOWN])
        more = len(self.skipped) - SKIPPED_SHOWN
        return shown + (f"; and {more} more" if more > 0 else "")


def start_pool(workers: int, init_args: tuple):
    """A pool of tokenizing processes (None for one worker: the work runs in this process).

    Forked while MindSpore is not loaded yet (cheap: no re-import), else spawned: MindSpore's
    threads do not survive a fork.
    """
    if workers <= 1:
        return None
    import multiprocessing
    import sys

    method = "spawn" if "mindspore" in sys.modules else "fork"
    return multiprocessing.get_context(method).Pool(workers, init_worker, init_args)


def _results(chunks: Iterator[list], pool, workers: int, init_args: tuple):
    """encode_chunk over the chunks, in order; with a pool, at most IN_FLIGHT chunks per worker queued."""
    if pool is None:
        init_worker(*init_args)
        for chunk in chunks:
            yield len(chunk), encode_chunk(chunk)
        return
    pending: deque = deque()
    for chunk in chunks:
        pending.append((len(chunk), pool.apply_async(encode_chunk, (chunk,))))
        if len(pending) >= IN_FLIGHT * workers:
            n, result = pending.popleft()
            yield n, result.get()
    while pending:
        n, result = pending.popleft()
        yield n, result.get()


def prepare(source: Path, fmt: str, tokenizer: Path, out: Path, length: int, workers: int = 1,
            strict: bool = False, force: bool = False, progress=None, template: str = "vicuna") -> Report:
    """Write the directory `out` of MindRecord parts: records of `length` tokens of the chat `template`.
    `progress(rows_done)` is called per chunk.

    Bad rows are skipped and listed in the report, or with `strict` end the run with nothing written.
    """
    from launcher.data.mindrecord import refuse_existing

    source, out = Path(source), Path(out)
    if not source.is_file():
        raise ConfigError(f"data.source: {source} does not exist")
    if fmt not in (*INSTRUCTION_KEYS, "conversation"):
        raise ConfigError(f"data.format: unknown format '{fmt}'")
    refuse_existing(out, force)
    from launcher.data.tokenization import get_template
    from launcher.data.tokenizer import load_tokenizer

    chat = get_template(template)
    chat.check(load_tokenizer(tokenizer))  # fail here, with one clear line, rather than in every worker
    report = Report(out)
    started = time.perf_counter()
    chunks = chunked(read_rows(source), CHUNK_ROWS)
    init_args = (str(tokenizer), fmt, length, template)
    pool = start_pool(workers, init_args)
    try:
        results = _results(chunks, pool, workers, init_args)
        # Queue the first chunks before the writer loads MindSpore, so that the workers start at once.
        first = next(results, None)
        results = itertools.chain([first] if first else [], results)
        _write(out, f"{fmt} conversations, {chat.version} template, {length} tokens", results, source,
               strict, report, progress)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    report.seconds = time.perf_counter() - started
    return report


def _write(out: Path, description: str, results, source: Path, strict: bool, report: Report, progress):
    from launcher.data.mindrecord import PREPARED_PAGES, atomic_mindrecord_dir

    with atomic_mindrecord_dir(out, description, **PREPARED_PAGES) as write:
        done = 0
        for n, (ids, labels, truncated, bad) in results:
            if bad and strict:
                shown = "; ".join(f"line {line}: {why}" for line, why in bad[:5])
                raise ConfigError(f"{source}: {shown} (--strict: nothing was written; drop --strict to skip bad rows)")
            report.skipped += bad
            report.truncated += len(truncated)
            if len(ids):
                write([{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)])
                report.written += len(ids)
            done += n
            if progress:
                progress(done)
        if report.written == 0:
            raise ConfigError(f"{source}: no usable rows; {report.skipped_lines() or 'the file is empty'}")


def default_workers() -> int:
    return os.cpu_count() or 1
