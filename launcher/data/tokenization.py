"""Tokenizers and the chat template of `launcher data prepare`.

Facts reproduced from MindFormers (read for the facts only):
- mindformers/tools/dataset_preprocess/llama/conversation.py, template "vicuna_v1.1": the system
  prompt below, roles USER and ASSISTANT, separator " " after the system prompt and each user turn,
  "</s>" (the end-of-sequence token) after each assistant turn; a turn reads "ROLE: text".
- mindformers/tools/dataset_preprocess/llama/llama_preprocess.py: IGNORE_TOKEN_ID = -100; a record
  starts with the BOS token; the system prompt and every user turn, up to and including "ASSISTANT:",
  are masked; each answer and its EOS are learned; padding and what lies past the end are masked;
  records are seq_length + 1 tokens (the model shifts input_ids against labels itself).
- research/qwen1_5/qwen1_5_preprocess.py and Qwen2's tokenizer: no BOS, `<|endoftext|>` is EOS and
  pad; byte-level BPE over vocab.json + merges.txt with the pre-tokenizer pattern in QWEN2_PATTERN.

Each part of the template is encoded on its own, so the label mask falls exactly on token
boundaries: the first learned label is the first token of the answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from launcher.errors import ConfigError

IGNORE_INDEX = -100
# Bump when the template or the masking changes: it is part of the cache key of prepared data.
TEMPLATE_VERSION = "vicuna_v1.1-1"
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
# Qwen2Tokenizer's pre-tokenizer pattern (transformers models/qwen2/tokenization_qwen2.py).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


class SentencePieceTokenizer:
    """A sentencepiece `tokenizer.model` (Llama2, Baichuan2)."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos = self.sp.eos_id()
        # Llama's model has no pad piece; MindFormers pads with id 0 (<unk>) there.
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The model adds its own "▁" before each piece of text, which stands for the space that
        # the template puts there; the spaces in front are dropped so that it is not doubled.
        return self.sp.encode([t[1:] if t.startswith(" ") else t for t in texts], num_threads=1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


class ByteLevelBpeTokenizer:
    """vocab.json + merges.txt, byte-level BPE with Qwen2's pre-tokenizer (Qwen1.5)."""

    kind = "bpe"

    def __init__(self, directory: Path):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.path = directory
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        tok = Tokenizer(BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Qwen's special tokens follow the vocabulary (151643.. for Qwen1.5) unless it lists them.
        missing = [s for s in QWEN2_SPECIALS if s not in vocab]
        tok.add_special_tokens(missing)
        self.tok = tok
        self.bos = None
        self.eos = self.pad = tok.token_to_id("<|endoftext|>")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_files(path: str | Path) -> list[Path]:
    """The files that define the tokenizer at `path` (a tokenizer.model, or a directory)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "tokenizer.model").is_file():
        return [path / "tokenizer.model"]
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return [path / "vocab.json", path / "merges.txt"]
    raise ConfigError(
        f"data.tokenizer: {path} is neither a sentencepiece tokenizer.model nor a directory with "
        "tokenizer.model or vocab.json + merges.txt"
    )


def load_tokenizer(path: str | Path):
    files = tokenizer_files(path)
    try:
        if files[0].name == "vocab.json":
            return ByteLevelBpeTokenizer(files[0].parent)
        return SentencePieceTokenizer(files[0])
    except Exception as exc:  # sentencepiece and tokenizers raise plain Exceptions
        raise ConfigError(f"data.tokenizer: {path} does not load ({exc.__class__.__name__}: {exc})") from None


def template_parts(turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """(text, learned) pieces of a conversation of (user, assistant) pairs, in the vicuna_v1.1 layout.

    "{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"; the "</s>" is the EOS
    token, added by the caller after each learned part.
    """
    parts: list[tuple[str, bool]] = []
    for i, (question, answer) in enumerate(turns):
        head = f"{SYSTEM_PROMPT} " if i == 0 else ""
        parts.append((f"{head}{USER}: {question} {ASSISTANT}:", False))
        parts.append((f" {answer}", True))
    return parts


def chat_prompt(question: str) -> str:
    """A question as the first user turn of the template, up to where the assistant's answer starts."""
    return template_parts([(question, "")])[0][0]


def encode_rows(tokenizer, rows: list[list[tuple[str, str]]], length: int):
    """Token ids and labels of `length` tokens per conversation, in one batch call to the tokenizer.

    Returns (input_ids [n, length] int32, labels [n, length] int32, truncated: list[bool],
    empty: list[bool]) where empty means no answer token fits in `length`.
    """
    parts = [template_parts(turns) for turns in rows]
    flat = tokenizer.encode_batch([text for row in parts for text, _ in row])
    n = len(rows)
    input_ids = np.full((n, length), tokenizer.pad, np.int32)
    labels = np.full((n, length), IGNORE_INDEX, np.int32)
    truncated, empty = [False] * n, [False] * n
    k = 0
    for r, row in enumerate(parts):
        ids: list[int] = [tokenizer.bos] if tokenizer.bos is not None else []
        mask: list[bool] = [False] * len(ids)
        for _, learned in row:
            piece = flat[k]
            k += 1
            if learned:
                piece = [*piece, tokenizer.eos]
            ids.extend(piece)
            mask.extend([learned] * len(piece))
        if len(ids) > length:
            truncated[r] = True
            ids, mask = ids[:length], mask[:length]
        row_ids = np.asarray(ids, np.int32)
        input_ids[r, : len(ids)] = row_ids
        labels[r, : len(ids)] = np.where(mask, row_ids, IGNORE_INDEX)
        empty[r] = not any(mask)
    return input_ids, labels, truncated, empty
