"""launcher/ckpt/stream.py against the real mindspore.save_checkpoint / load_checkpoint, both directions."""

import tracemalloc

import numpy as np
import pytest

from launcher.ckpt import stream
from launcher.errors import LauncherError

ms = pytest.importorskip("mindspore")

# numpy dtype -> MindSpore's tensor_type string, every type a checkpoint commonly holds
NUMPY_TYPES = {np.int8: "Int8", np.uint8: "UInt8", np.int16: "Int16", np.uint16: "UInt16", np.int32: "Int32",
               np.uint32: "UInt32", np.int64: "Int64", np.uint64: "UInt64", np.float16: "Float16",
               np.float32: "Float32", np.float64: "Float64", np.bool_: "Bool"}


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {}
    for dtype, kind in NUMPY_TYPES.items():
        params[f"model.{kind.lower()}"] = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    params["model.bool"] = rng.random(7) > 0.5
    params["scalar.f32"] = np.array(2.5, np.float32)  # shape (): a checkpoint stores no dims
    params["scalar.i64"] = np.array(16, np.int64)
    params["one"] = np.array([7], np.int32)
    params["deep"] = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    return params


def ms_save(params: dict, path, **kwargs):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], str(path), **kwargs)
    return path


def ms_numpy(value) -> np.ndarray:
    """A loaded Parameter as numpy; bfloat16 (no numpy type) as float32."""
    if value.dtype == ms.bfloat16:
        value = value.astype(ms.float32)
    return value.asnumpy()


def assert_same(got: dict, expected: dict):
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_iter_params_reads_what_mindspore_saves(tmp_path):
    params = sample()
    path = ms_save(params, tmp_path / "a.ckpt", append_dict={"note": "hello"})
    got = dict(stream.iter_params(path))
    assert got.pop("note") == np.array("hello")  # a str value of append_dict, as a 0-d numpy str
    assert_same(got, params)
    assert stream.param_names(path) == [*params, "note"]


def test_bfloat16_is_read_as_float32_and_written_back_as_bfloat16(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    path = tmp_path / "bf16.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(x).astype(ms.bfloat16)}], str(path))
    (name, value), = stream.iter_params(path)
    assert value.dtype == np.float32
    expected = ms_numpy(ms.load_checkpoint(str(path))["w"])
    np.testing.assert_array_equal(value, expected)

    # write a float32 array as bfloat16: rounded the way MindSpore's cast rounds
    out = tmp_path / "out.ckpt"
    with stream.CheckpointWriter(out) as w:
        w.write("w", x, tensor_type=stream.BFLOAT16)
    back = ms.load_checkpoint(str(out))["w"]
    assert back.dtype == ms.bfloat16
    np.testing.assert_array_equal(ms_numpy(back), expected)
    assert out.read_bytes() == path.read_bytes()


def test_writer_output_loads_back_identically_and_byte_for_byte(tmp_path):
    params = sample()
    mine = tmp_path / "mine.ckpt"
    with stream.CheckpointWriter(mine) as w:
        for name, value in params.items():
            w.write(name, value)
        w.write("note", np.array("hello"))
    assert not list(tmp_path.glob("*.partial"))
    loaded = ms.load_checkpoint(str(mine))
    assert loaded.pop("note") == "hello"
    assert list(loaded) == list(params)
    for name, value in params.items():
        assert str(loaded[name].dtype) == NUMPY_TYPES[value.dtype.type], name
        assert tuple(loaded[name].shape) == value.shape, name
        np.testing.assert_array_equal(loaded[name].asnumpy(), value, err_msg=name)
    theirs = ms_save(params, tmp_path / "theirs.ckpt", append_dict={"note": "hello"})
    assert mine.read_bytes() == theirs.read_bytes()


def test_pieces_of_one_tensor_are_joined_both_ways(tmp_path, monkeypatch):
    # MindSpore cuts a tensor of more than 512 MiB into 512 MiB Values of one tag; smaller pieces here
    # (SLICE_SIZE is in KiB: 1 -> 1 KiB pieces), the test with a real 512 MiB tensor is below.
    import mindspore.train.serialization as serialization

    params = {"before": np.arange(3, dtype=np.int32),
              "big": np.random.default_rng(2).standard_normal((37, 29)).astype(np.float32),  # 4292 B: 5 pieces
              "after": np.array(1.0, np.float16)}
    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    path = ms_save(params, tmp_path / "pieces.ckpt")
    assert path.read_bytes().count(b"\n\x03big") == 5
    assert_same(dict(stream.iter_params(path)), params)

    monkeypatch.setattr(stream, "CHUNK_BYTES", 1000)  # not a multiple of the item size
    out = tmp_path / "mine.ckpt"
    with stream.CheckpointWriter(out) as w:
        for name, value in params.items():
            w.write(name, value)
    assert out.read_bytes().count(b"\n\x03big") == 5
    loaded = ms.load_checkpoint(str(out))
    assert list(loaded) == list(params)
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)


def test_pieces_copy_a_tensor_exactly_in_bounded_pieces(tmp_path, monkeypatch):
    params = sample()
    src = ms_save(params, tmp_path / "src.ckpt")
    monkeypatch.setattr(stream, "PIECE_BYTES", 16)  # 2 int64 or 8 float16 a piece; pieces cross the Values
    monkeypatch.setattr(stream, "CHUNK_BYTES", 24)
    out = tmp_path / "copy.ckpt"
    with stream.CheckpointReader(src) as reader, stream.CheckpointWriter(out) as w:
        entry = reader.by_name["model.float64"]  # 120 bytes: 8 pieces, 5 Values
        assert [len(p) for p in reader.pieces(entry)] == [16] * 7 + [8]
        for entry in reader.entries:
            w.copy(reader, entry)
    assert out.read_bytes().count(b"\n\rmodel.float64") == 5
    loaded = ms.load_checkpoint(str(out))
    assert list(loaded)[:len(params)] == list(params)
    for name, value in params.items():
        np.testing.assert_array_equal(loaded[name].asnumpy(), value)
    with pytest.raises(ValueError, match="4 bytes written, 8 announced"):
        with stream.CheckpointWriter(tmp_path / "short.ckpt") as w:
            w.write_pieces("short", "Float32", [2], 8, [b"1234"])
    assert not list(tmp_path.glob("short*"))


def test_a_tensor_larger_than_mindspores_512_mib_pieces(tmp_path):
    rows = stream.CHUNK_BYTES // 4096 + 3
    big = np.empty((rows, 4096), np.uint8)
    big[:] = np.arange(rows, dtype=np.uint8)[:, None]  # every row differs from its neighbours
    big[-1, -1] = 77
    path = tmp_path / "big.ckpt"
    ms.save_checkpoint([{"name": "big", "data": ms.Tensor(big)}, {"name": "tail", "data": ms.Tensor(np.ones(2))}],
                       str(path))
    assert stream.param_names(path) == ["big", "tail"]
    with stream.CheckpointReader(path) as reader:
        assert len(reader.by_name["big"].chunks) == 2
    got = dict(stream.iter_params(path))
    assert np.array_equal(got["big"], big) and np.array_equal(got["tail"], np.ones(2))
    del got
    path.unlink()

    out = tmp_path / "mine.ckpt"
    with stream.CheckpointWriter(out) as w:
        w.write("big", big)
        w.write("tail", np.ones(2))
    loaded = ms.load_checkpoint(str(out))
    assert list(loaded) == ["big", "tail"]
    assert np.array_equal(loaded["big"].asnumpy(), big)


def test_iter_params_holds_one_tensor_at_a_time(tmp_path):
    tensor = np.ones((512, 1024), np.float32)  # 2 MiB each, 32 MiB of file
    path = tmp_path / "many.ckpt"
    with stream.CheckpointWriter(path) as w:
        for i in range(16):
            w.write(f"layers.{i}.w", tensor * i)
    tracemalloc.start()
    try:
        seen = []
        for name, value in stream.iter_params(path):
            assert value[0, 0] == len(seen)
            seen.append(name)
            del value
        assert stream.param_names(path) == seen
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == [f"layers.{i}.w" for i in range(16)]
    assert peak < 3 * tensor.nbytes, f"peak {peak} B for tensors of {tensor.nbytes} B"


def test_crc_trailer_of_crc_check_is_skipped(tmp_path):
    params = sample()
    path = ms_save(params, tmp_path / "crc.ckpt", crc_check=True)
    assert path.read_bytes()[-17:-10] == b"crc_num"
    assert_same(dict(stream.iter_params(path)), params)


def unreadable_message(path) -> str:
    with pytest.raises(LauncherError) as caught:
        list(stream.iter_params(path))
    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable MindSpore checkpoint: ") and "\n" not in message
    return message


def test_truncated_and_garbage_files_raise_one_clear_line(tmp_path):
    whole = ms_save(sample(), tmp_path / "whole.ckpt").read_bytes()
    for cut in (len(whole) - 5, len(whole) // 2, 3, 1):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(whole[:cut])
        assert "truncated" in unreadable_message(path)
        with pytest.raises(LauncherError):
            stream.param_names(path)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(np.random.default_rng(3).bytes(4096))
    unreadable_message(garbage)
    text = tmp_path / "text.ckpt"
    text.write_text("model:\n  arch: llama\n")
    unreadable_message(text)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert "empty" in unreadable_message(empty)
    assert "No such file" in unreadable_message(tmp_path / "missing.ckpt")


def test_writer_removes_the_partial_file_when_the_block_fails(tmp_path):
    path = tmp_path / "out.ckpt"
    with pytest.raises(RuntimeError):
        with stream.CheckpointWriter(path) as w:
            w.write("a", np.ones(3, np.float32))
            assert (tmp_path / "out.ckpt.partial").exists() and not path.exists()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="complex"):
        with stream.CheckpointWriter(path) as w:
            w.write("c", np.ones(2, np.complex64))
    assert list(tmp_path.iterdir()) == []
