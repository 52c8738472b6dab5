"""The chat templates of `launcher data prepare` (vicuna, chatml) and the label mask of a record.

Facts reproduced from MindFormers and Hugging Face (read for the facts only):
- mindformers/tools/dataset_preprocess/llama/conversation.py, template "vicuna_v1.1": the system
  prompt below, roles USER and ASSISTANT, separator " " after the system prompt and each user turn,
  "</s>" (the end-of-sequence token) after each assistant turn; a turn reads "ROLE: text".
- mindformers/tools/dataset_preprocess/llama/llama_preprocess.py: IGNORE_TOKEN_ID = -100; a record
  starts with the BOS token; the system prompt and every user turn, up to and including "ASSISTANT:",
  are masked; each answer and its EOS are learned; padding and what lies past the end are masked;
  records are seq_length + 1 tokens (the model shifts input_ids against labels itself).
- ChatML, as the Hugging Face chat templates of Qwen1.5 and SmolLM2 and research/qwen1_5/qwen1_5_chat.py
  write it: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, the system message first; Qwen1.5's
  default system message is "You are a helpful assistant." (research/qwen1_5/alpaca_converter.py and
  qwen1_5_chat.py). A generation prompt ends with "<|im_start|>assistant\\n".

Each part of the template is encoded on its own, so the label mask falls exactly on token
boundaries: the first learned label is the first token of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from launcher.errors import ConfigError

IGNORE_INDEX = -100
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

Turns = list[tuple[str, str]]
Parts = list[tuple[str, bool]]


def vicuna_parts(turns: Turns) -> Parts:
    """"{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"; the "</s>" is the end token,
    added by the caller after each learned part."""
    parts: Parts = []
    for i, (question, answer) in enumerate(turns):
        head = f"{SYSTEM_PROMPT} " if i == 0 else ""
        parts.append((f"{head}{USER}: {question} {ASSISTANT}:", False))
        parts.append((f" {answer}", True))
    return parts


def chatml_parts(turns: Turns) -> Parts:
    """"<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
    {a}<|im_end|>\\n<|im_start|>user\\n...": the caller adds the <|im_end|> after each learned part; the
    "\\n" after it opens the next masked part, and the last one is masked too."""
    parts: Parts = []
    for i, (question, answer) in enumerate(turns):
        head = f"{IM_START}system\n{CHATML_SYSTEM_PROMPT}{IM_END}\n" if i == 0 else "\n"
        parts.append((f"{head}{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n", False))
        parts.append((answer, True))
    parts.append(("\n", False))
    return parts


@dataclass(frozen=True)
class Template:
    name: str
    # Bump when the layout or the masking changes: it is part of the cache key of prepared data.
    version: str
    parts: Callable[[Turns], Parts]
    end: str | None  # the special token that ends each answer; None: the tokenizer's EOS
    specials: tuple[str, ...] = ()  # special tokens the text needs as single ids

    def check(self, tokenizer, what: str = "data.template") -> None:
        missing = [s for s in self.specials if tokenizer.special_id(s) is None]
        if missing:
            raise ConfigError(f"{what}: {self.name} needs {' and '.join(self.specials)} as single special tokens; "
                              f"the tokenizer {tokenizer.path} has no {', '.join(missing)}")

    def end_id(self, tokenizer) -> int:
        return tokenizer.eos if self.end is None else tokenizer.special_id(self.end)

    def prompt(self, question: str) -> str:
        """A question as the first user turn, up to where the assistant's answer starts."""
        return self.parts([(question, "")])[0][0]


TEMPLATES = {
    "vicuna": Template("vicuna", "vicuna_v1.1-1", vicuna_parts, None),
    "chatml": Template("chatml", "chatml-1", chatml_parts, IM_END, (IM_START, IM_END)),
}


def get_template(name: str, what: str = "data.template") -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"{what}: unknown template '{name}' ({' or '.join(TEMPLATES)})")
    return TEMPLATES[name]


def encode_rows(tokenizer, rows: list[Turns], length: int, template: Template = TEMPLATES["vicuna"]):
    """Token ids and labels of `length` tokens per conversation, in one batch call to the tokenizer.

    Returns (input_ids [n, length] int32, labels [n, length] int32, truncated: list[bool],
    empty: list[bool]) where empty means no answer token fits in `length`.
    """
    parts = [template.parts(turns) for turns in rows]
    flat = tokenizer.encode_batch([text for row in parts for text, _ in row])
    end = template.end_id(tokenizer)
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
                piece = [*piece, end]
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
