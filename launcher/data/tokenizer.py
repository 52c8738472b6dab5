"""The tokenizers `launcher data prepare` and `launcher predict` read, behind one small interface.

Each has `bos` (None: no BOS token), `eos`, `pad`, `encode_batch(texts)` (no special tokens added;
those written in the text become their single ids), `decode(ids)` and `special_id(token)`.

Facts reproduced from their sources (read for the facts only):
- research/qwen1_5/qwen1_5_tokenizer.py (MindFormers) and Qwen2's tokenizer: no BOS, `<|endoftext|>` is
  EOS and pad; byte-level BPE over vocab.json + merges.txt with the pre-tokenizer pattern in QWEN2_PATTERN.
- Hugging Face's tokenizer_config.json: bos_token, eos_token, pad_token are strings or {"content": ...}
  objects; add_bos_token says whether a text starts with the BOS token (we default to no).
"""

from __future__ import annotations

import json
from pathlib import Path

from launcher.errors import ConfigError

# Qwen2Tokenizer's pre-tokenizer pattern (transformers models/qwen2/tokenization_qwen2.py).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
FORMS = ("neither a sentencepiece tokenizer.model nor a directory with tokenizer.json + tokenizer_config.json, "
         "tokenizer.model, or vocab.json + merges.txt")


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

    def special_id(self, token: str) -> int | None:
        return None  # the model would put a "▁" before it: it never becomes one id of the text


class HfTokenizer:
    """A `tokenizers.Tokenizer`: the byte-level BPE of vocab.json + merges.txt, or a tokenizer.json."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def special_id(self, token: str) -> int | None:
        # Added tokens are matched in the text before the model splits it, so they stay one id.
        return next((i for i, t in self.tok.get_added_tokens_decoder().items() if t.content == token), None)

    def token(self, id_: int | None) -> str | None:
        return None if id_ is None else self.tok.id_to_token(id_)


class ByteLevelBpeTokenizer(HfTokenizer):
    """vocab.json + merges.txt, byte-level BPE with Qwen2's pre-tokenizer (Qwen1.5)."""

    kind = "bpe"

    def __init__(self, directory: Path):
        from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.path = directory
        tok = Tokenizer(BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Qwen's special tokens follow the vocabulary (151643.. for Qwen1.5); one the vocabulary
        # lists keeps its id, and is still matched whole in the text.
        tok.add_special_tokens(list(QWEN2_SPECIALS))
        self.tok = tok
        self.bos = None
        self.eos = self.pad = tok.token_to_id("<|endoftext|>")


def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


class TokenizerJson(HfTokenizer):
    """A Hugging Face tokenizer directory: tokenizer.json and tokenizer_config.json (SmolLM2, Qwen2)."""

    kind = "tokenizer.json"

    def __init__(self, directory: Path):
        from tokenizers import Tokenizer

        self.path = directory
        self.tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        self.eos = self._id(config, "eos_token")
        if self.eos is None:
            raise ConfigError(f"{directory / 'tokenizer_config.json'} names no eos_token")
        self.pad = self._id(config, "pad_token")
        if self.pad is None:
            self.pad = self.eos
        self.bos = self._id(config, "bos_token") if config.get("add_bos_token") else None
        if config.get("add_bos_token") and self.bos is None:
            raise ConfigError(f"{directory / 'tokenizer_config.json'}: add_bos_token is true but no bos_token is named")

    def _id(self, config: dict, key: str) -> int | None:
        token = _config_token(config, key)
        if token is None:
            return None
        id_ = self.tok.token_to_id(token)
        if id_ is None:
            raise ConfigError(f"{self.path / 'tokenizer_config.json'}: {key} {token!r} is not in tokenizer.json")
        return id_


def tokenizer_files(path: str | Path, what: str = "data.tokenizer") -> list[Path]:
    """The files that define the tokenizer at `path` (they make the cache key of prepared data)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "tokenizer.json").is_file():
        if not (path / "tokenizer_config.json").is_file():
            raise ConfigError(f"{what}: {path} has tokenizer.json but no tokenizer_config.json (it names the "
                              "end-of-sequence token)")
        return [path / "tokenizer.json", path / "tokenizer_config.json"]
    if (path / "tokenizer.model").is_file():
        return [path / "tokenizer.model"]
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return [path / "vocab.json", path / "merges.txt"]
    raise ConfigError(f"{what}: {path} is {FORMS}")


def load_tokenizer(path: str | Path, what: str = "data.tokenizer"):
    files = tokenizer_files(path, what)
    try:
        if files[0].name == "tokenizer.json":
            return TokenizerJson(files[0].parent)
        if files[0].name == "vocab.json":
            return ByteLevelBpeTokenizer(files[0].parent)
        return SentencePieceTokenizer(files[0])
    except ConfigError:
        raise
    except Exception as exc:  # sentencepiece and tokenizers raise plain Exceptions
        raise ConfigError(f"{what}: {path} does not load ({exc.__class__.__name__}: {exc})") from None
