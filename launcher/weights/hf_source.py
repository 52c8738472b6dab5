"""A Hugging Face model directory: config.json, *.safetensors, tokenizer files; read without torch.

safetensors (huggingface/safetensors docs, "Format"): an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the bytes. The
files are memory-mapped and each tensor is copied out on its own, so memory holds one tensor at a time.
The header is read here rather than with safetensors' numpy backend because bfloat16, the usual dtype
of released checkpoints, has no numpy type: it is widened to float32 (exactly) here.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
from pathlib import Path

import numpy as np

from launcher.errors import ConfigError
from launcher.weights.families import Family, family_of_hf

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "generation_config.json")


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its header length")
            (length,) = struct.unpack("<Q", raw)
            header = json.loads(f.read(length))
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + length + end > size:
            raise ConfigError(f"{path} is truncated: {name} ends at byte {8 + length + end}, the file has {size}")
    return header, 8 + length


def tensor_from(buffer, info: dict, data_start: int, where: str) -> np.ndarray:
    begin, end = (data_start + o for o in info["data_offsets"])
    shape = tuple(info["shape"])
    if info["dtype"] == "BF16":
        raw = np.frombuffer(buffer, np.uint16, (end - begin) // 2, begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    dtype = DTYPES.get(info["dtype"])
    if dtype is None:
        raise ConfigError(f"{where}: dtype {info['dtype']} is not supported")
    return np.frombuffer(buffer, dtype, (end - begin) // np.dtype(dtype).itemsize, begin).reshape(shape).copy()


class HfModel:
    def __init__(self, directory: Path):
        self.path = directory
        config_file = directory / "config.json"
        try:
            self.config = json.loads(config_file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{directory} has no config.json; is it a Hugging Face model directory?") from None
        except ValueError as exc:
            raise ConfigError(f"{config_file} is not valid JSON ({exc})") from None
        self.family: Family = family_of_hf(self.config)
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise ConfigError(f"{directory} has no *.safetensors weights (pytorch_model.bin is not read: "
                              "convert it to safetensors first)")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in self.files:
            header, start = read_header(file)
            for name, info in header.items():
                self._where[name] = (file, info, start)
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor_names(self) -> dict[str, str]:
        return {name: name for name in self._where}

    def tensor(self, name: str) -> np.ndarray:
        file, info, start = self._where[name]
        if file not in self._maps:
            with open(file, "rb") as f:
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return tensor_from(self._maps[file], info, start, f"{file.name}: {name}")

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def write_tokenizer(self, target: Path) -> None:
        """The directory's own tokenizer files, copied as they are."""
        files = self.tokenizer_files()
        if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
            raise ConfigError(f"{self.path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
        for f in files:
            shutil.copyfile(f, target / f.name)

    def source_files(self) -> list[Path]:
        return [self.path / "config.json", *self.files, *self.tokenizer_files()]
