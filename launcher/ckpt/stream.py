"""Read and write MindSpore .ckpt files one parameter at a time, so memory stays about one tensor.

The format, as the installed MindSpore 2.7.2 writes and reads it
(.venv/lib/python3.11/site-packages/mindspore/train/checkpoint_pb2.py and train/serialization.py):
- checkpoint_pb2.py (checkpoint.proto, proto2):
    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }
- serialization.py _exec_save/_write_parameter_bytes_data: save_checkpoint appends one serialized Checkpoint of a
  single Value per piece of a tensor (concatenated protobuf messages parse as one). A tensor of more than
  1024 * SLICE_SIZE = 512 MiB is cut into 512 MiB pieces of its raw bytes, each a Value with the same tag, dims and
  tensor_type; _load_into_param_dict joins consecutive Values of one tag. tensor_type is str(dtype) ("Float32",
  "BFloat16", "Bool", ...), tensor_content the C-order little-endian bytes, a scalar has no dims. A str value
  (append_dict) is tensor_type "str", dims [0], numpy's UCS-4 bytes. Tensors of 0 bytes are not written at all.
- with crc_check=True the file ends with b"crc_num" + a 10-byte big-endian CRC32 (_parse_ckpt_proto strips it;
  it is not checked here, as load_checkpoint does not check it by default). Encrypted files are refused.
The protobuf wire format is parsed here by hand: a whole-file protobuf object would hold every tensor at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from launcher.errors import LauncherError

# serialization.py: chunk_size = 1024 * SLICE_SIZE bytes, SLICE_SIZE = 512 * 1024.
CHUNK_BYTES = 512 * 1024 * 1024
# CheckpointReader.pieces: a multiple of every item size, so each piece holds whole elements.
PIECE_BYTES = 16 * 1024 * 1024
BFLOAT16 = "BFloat16"
STR = "str"
_CRC_MARK, _CRC_TRAILER = b"crc_num", 17

_DTYPES = {
    "Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
    "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Float16": np.float16, "Float32": np.float32,
    "Float64": np.float64, "Bool": np.bool_,
}
_TYPE_OF = {np.dtype(v): k for k, v in _DTYPES.items()}
NUMERIC_TYPES = frozenset(_DTYPES) | {BFLOAT16}  # what decode() turns into numpy
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _DTYPES.items()}, BFLOAT16: 2}


class _Bad(Exception):
    """Why a file is not a checkpoint; turned into one LauncherError line naming the file."""


def unreadable(path, why) -> LauncherError:
    return LauncherError(f"{path} is not a readable MindSpore checkpoint: {why}")


@dataclass(frozen=True)
class Entry:
    """One parameter of a checkpoint file: its header, and where its bytes are (no data)."""
    name: str
    tensor_type: str
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]  # (file offset, length) of each piece of tensor_content

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.chunks)


# ---- reading ----

def iter_params(path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every parameter, in file order, one tensor in memory at a time.

    Arrays keep their dtype, except bfloat16 (numpy has none): it comes as float32, exactly.
    A str value comes as a 0-d numpy str array."""
    with CheckpointReader(path) as reader:
        for entry in reader.entries:
            yield entry.name, reader.array(entry)


def param_names(path) -> list[str]:
    """The parameter names in file order, from the headers only."""
    with CheckpointReader(path) as reader:
        return [e.name for e in reader.entries]


class CheckpointReader:
    """An open checkpoint: .entries (file order) and .by_name from one pass over the headers, which seeks past
    the tensor data; then read any entry's data, in any order. Raises LauncherError for a file that is not one."""

    def __init__(self, path):
        self.path = path
        try:
            self._f = open(path, "rb", buffering=1 << 13)  # headers are small; data is read past the buffer
        except OSError as exc:
            raise unreadable(path, exc.strerror or exc) from None
        try:
            self.entries = _scan(self._f, os.fstat(self._f.fileno()).st_size)
        except _Bad as exc:
            self._f.close()
            raise unreadable(path, exc) from None
        self.by_name = {e.name: e for e in self.entries}

    def raw(self, entry: Entry) -> bytearray:
        """The entry's tensor_content, its pieces joined."""
        buf = bytearray(entry.nbytes)
        view, at = memoryview(buf), 0
        for offset, n in entry.chunks:
            self._f.seek(offset)
            if self._f.readinto(view[at:at + n]) != n:
                raise unreadable(self.path, f"{entry.name}: the file ends inside its data (changed while read?)")
            at += n
        return buf

    def pieces(self, entry: Entry, size: int | None = None) -> Iterator[np.ndarray]:
        """The entry's bytes as uint8 arrays of `size` (PIECE_BYTES) bytes, the last one shorter, read into one
        buffer that is reused: a piece is valid until the next one. Memory stays one piece however large the
        tensor."""
        buf = np.empty(min(size or PIECE_BYTES, entry.nbytes), np.uint8)
        view, filled = memoryview(buf), 0
        for offset, n in entry.chunks:
            done = 0
            while done < n:
                take = min(n - done, len(buf) - filled)
                self._f.seek(offset + done)  # the caller may read elsewhere between two pieces
                if self._f.readinto(view[filled:filled + take]) != take:
                    raise unreadable(self.path, f"{entry.name}: the file ends inside its data (changed while read?)")
                filled, done = filled + take, done + take
                if filled == len(buf):
                    yield buf
                    filled = 0
        if filled:
            yield buf[:filled]

    def array(self, entry: Entry, data=None) -> np.ndarray:
        """The entry as numpy (bfloat16 as float32); data: its raw() bytes if already read."""
        data = self.raw(entry) if data is None else data
        if entry.tensor_type == STR:
            return np.frombuffer(data, f"<U{len(data) // 4}").reshape(())
        if entry.tensor_type not in NUMERIC_TYPES:
            raise LauncherError(f"{self.path}: {entry.name} has tensor_type {entry.tensor_type}, "
                                "which has no numpy type here")
        return decode(data, entry.tensor_type).reshape(entry.shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode(data, tensor_type: str) -> np.ndarray:
    """Raw bytes (or a piece of them) of a numeric tensor_type as a flat array; bfloat16 as float32."""
    if tensor_type == BFLOAT16:  # bfloat16 is the top half of a float32
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, _DTYPES[tensor_type])


def _scan(f, size: int) -> list[Entry]:
    end = size
    if size >= _CRC_TRAILER:
        f.seek(size - _CRC_TRAILER)
        if f.read(len(_CRC_MARK)) == _CRC_MARK:
            end = size - _CRC_TRAILER
        f.seek(0)
    entries: list[Entry] = []
    pos = 0
    while pos < end:
        key = _varint(f)
        if key != (1 << 3 | 2):  # Checkpoint.value, length-delimited: the only field at the top
            raise _Bad(f"unexpected protobuf field {key >> 3} (wire type {key & 7}) at byte {pos}")
        length = _varint(f)
        stop = f.tell() + length
        if stop > end:
            raise _Bad(f"truncated: the entry at byte {pos} ends at byte {stop}, the file at {end}")
        name, tensor_type, shape, chunk = _value(f, stop, pos)
        last = entries[-1] if entries else None
        if last is not None and last.name == name:  # a piece of a tensor larger than CHUNK_BYTES
            if (last.tensor_type, last.shape) != (tensor_type, shape):
                raise _Bad(f"{name}: its pieces disagree on type or shape")
            entries[-1] = Entry(name, tensor_type, shape, last.chunks + (chunk,))
        else:
            entries.append(Entry(name, tensor_type, shape, (chunk,)))
        f.seek(stop)
        pos = stop
    if not entries:
        raise _Bad("the file is empty" if size == 0 else "it holds no parameters")
    for e in entries:
        if e.tensor_type in _ITEMSIZE and e.nbytes != _ITEMSIZE[e.tensor_type] * int(np.prod(e.shape)):
            raise _Bad(f"{e.name} holds {e.nbytes} bytes, but {e.tensor_type} {list(e.shape)} needs "
                       f"{_ITEMSIZE[e.tensor_type] * int(np.prod(e.shape))}")
    return entries


def _value(f, stop: int, pos: int) -> tuple[str, str, tuple[int, ...], tuple[int, int]]:
    """Checkpoint.Value: tag and tensor header; the tensor data is only located."""
    name = tensor = None
    while f.tell() < stop:
        field, wire = _key(f)
        if field == 1 and wire == 2:
            name = _text(f, stop)
        elif field == 2 and wire == 2:
            tensor = _tensor(f, _sub_end(f, stop))
        elif field == 3:
            raise _Bad(f"{name or f'the entry at byte {pos}'} is a map parameter, which is not supported")
        else:
            _skip(f, wire, stop)
    if name is None or tensor is None:
        raise _Bad(f"the entry at byte {pos} has no {'tag' if name is None else 'tensor'}")
    return (name, *tensor)


def _tensor(f, stop: int) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    dims, tensor_type, chunk = [], None, None
    while f.tell() < stop:
        field, wire = _key(f)
        if field == 1 and wire == 0:
            dims.append(_int64(_varint(f)))
        elif field == 1 and wire == 2:  # packed dims: proto2 does not write them, but may read them
            packed_end = _sub_end(f, stop)
            while f.tell() < packed_end:
                dims.append(_int64(_varint(f)))
        elif field == 2 and wire == 2:
            tensor_type = _text(f, stop)
        elif field == 3 and wire == 2:
            content_end = _sub_end(f, stop)
            chunk = (f.tell(), content_end - f.tell())
            f.seek(content_end)
        else:
            _skip(f, wire, stop)
    if tensor_type is None or chunk is None:
        raise _Bad("a tensor without tensor_type or tensor_content")
    if tensor_type == STR:
        dims = []
    return tensor_type, tuple(dims), chunk


def _varint(f) -> int:
    result = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise _Bad("truncated: the file ends inside a protobuf header")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _Bad("malformed protobuf varint")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _key(f) -> tuple[int, int]:
    key = _varint(f)
    return key >> 3, key & 7


def _sub_end(f, stop: int) -> int:
    n = _varint(f)
    end = f.tell() + n
    if end > stop:
        raise _Bad(f"malformed protobuf: a field of {n} bytes overruns its message")
    return end


def _text(f, stop: int) -> str:
    end = _sub_end(f, stop)
    try:
        return f.read(end - f.tell()).decode()
    except UnicodeDecodeError:
        raise _Bad("a name that is not UTF-8") from None


def _skip(f, wire: int, stop: int) -> None:
    """An unknown field, skipped as protobuf does."""
    if wire == 0:
        _varint(f)
    elif wire in (1, 2, 5):
        f.seek(_sub_end(f, stop) if wire == 2 else f.tell() + (8 if wire == 1 else 4))
    else:
        raise _Bad(f"malformed protobuf: wire type {wire}")
    if f.tell() > stop:
        raise _Bad("malformed protobuf: a field overruns its message")


# ---- writing ----

def _uvarint(v: int) -> bytes:
    out = bytearray()
    while v > 0x7F:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _header(name: str, tensor_type: str, dims, content_len: int) -> bytes:
    """Everything of one Value before its tensor_content, byte for byte as protobuf serializes it."""
    tensor = b"".join(b"\x08" + _uvarint(d & 0xFFFFFFFFFFFFFFFF) for d in dims)
    kind = tensor_type.encode()
    tensor += b"\x12" + _uvarint(len(kind)) + kind + b"\x1a" + _uvarint(content_len)
    tag = name.encode()
    value = b"\x0a" + _uvarint(len(tag)) + tag + b"\x12" + _uvarint(len(tensor) + content_len) + tensor
    return b"\x0a" + _uvarint(len(value) + content_len) + value


def to_bfloat16(array) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    out = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x40
    return out


class CheckpointWriter:
    """with CheckpointWriter(path) as w: w.write(name, array) -- a file mindspore.load_checkpoint reads back.

    Writes <path>.partial and renames it to path when the block succeeds; removes it when the block raises."""

    def __init__(self, path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._f = None

    def __enter__(self):
        self._f = open(self.partial, "wb", buffering=1 << 20)
        return self

    def write(self, name: str, array, tensor_type: str | None = None) -> None:
        """tensor_type="BFloat16" stores a float array as bfloat16; else the array's own dtype is kept."""
        a = np.asarray(array)
        if a.dtype.kind == "U":
            self.write_raw(name, STR, [0], np.array(str(a.reshape(-1)[0] if a.size else "")).tobytes())
            return
        if tensor_type == BFLOAT16:
            data = to_bfloat16(a)
        else:
            tensor_type = tensor_type or _TYPE_OF.get(a.dtype.newbyteorder("="))
            if tensor_type not in _DTYPES:
                raise TypeError(f"{name}: no MindSpore checkpoint type for numpy {a.dtype}")
            data = np.ascontiguousarray(a, np.dtype(_DTYPES[tensor_type]).newbyteorder("<"))
        self.write_raw(name, tensor_type, a.shape, memoryview(data.reshape(-1)).cast("B"))

    def write_raw(self, name: str, tensor_type: str, shape, data) -> None:
        """Bytes already in MindSpore's layout (e.g. CheckpointReader.raw): copied as they are, any tensor_type."""
        data = memoryview(data).cast("B")
        self.write_pieces(name, tensor_type, shape, len(data), [data])

    def copy(self, reader: CheckpointReader, entry: Entry) -> None:
        """An entry of another checkpoint, its bytes as they are, a piece at a time."""
        self.write_pieces(entry.name, entry.tensor_type, entry.shape, entry.nbytes, reader.pieces(entry))

    def write_pieces(self, name: str, tensor_type: str, shape, nbytes: int, pieces) -> None:
        """A tensor of nbytes given as byte pieces of any sizes; cut into Values of CHUNK_BYTES as MindSpore does."""
        written = room = 0
        if nbytes == 0:  # one empty Value, so the name is not lost
            self._f.write(_header(name, tensor_type, shape, 0))
        for piece in pieces:
            piece = memoryview(piece).cast("B")
            while len(piece):
                if room == 0:
                    room = min(CHUNK_BYTES, nbytes - written)
                    if room <= 0:
                        raise ValueError(f"{name}: more than the {nbytes} bytes announced")
                    self._f.write(_header(name, tensor_type, shape, room))
                take = piece[:room]
                self._f.write(take)
                room, written, piece = room - len(take), written + len(take), piece[len(take):]
        if written != nbytes:
            raise ValueError(f"{name}: {written} bytes written, {nbytes} announced")

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._f.close()  # the last flush may fail too (disk full): then no file either
        except BaseException:
            self.partial.unlink(missing_ok=True)
            raise
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            self.partial.unlink(missing_ok=True)
