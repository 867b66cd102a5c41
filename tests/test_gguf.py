"""The GGUF reader: values, tensor table, zero-copy data, speed on a 7B-sized table, malformed files."""
import struct
import time

import numpy as np
import pytest

from zephyr import gguf
from zephyr.errors import GGUFError
from zephyr.gguf import GGUFValueType as V
from zephyr.testing.gguf_writer import TensorSpec, Typed, encode_header, write_gguf
from zephyr.quants import TYPE_INFO, GGMLType, dequantize
from zephyr.testing.synthetic import PRESETS, llama_metadata, llama_tensors, minimal_llama_vocab


# -- a raw builder, so tests can write files no honest writer would ---------------------------
def s(text):
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key, vtype, payload):
    return s(key) + struct.pack("<I", vtype) + payload


def tinfo(name, dims, ttype, offset):
    return s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, offset)


def raw_file(kvs=(), tensors=(), data=b"", version=3, magic=b"GGUF", n_kv=None, n_tensors=None, align=32):
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + b"\0" * (-len(head) % align) + data


def valid_parts():
    kvs = [kv("general.architecture", V.STRING, s("llama")), kv("x.count", V.UINT32, struct.pack("<I", 7))]
    tensors = [tinfo("a", (4, 2), GGMLType.F32, 0), tinfo("b", (32,), GGMLType.Q8_0, 32)]
    data = np.arange(8, dtype=np.float32).tobytes() + b"\0" * 0 + bytes(34)
    return kvs, tensors, data


@pytest.fixture
def write(tmp_path):
    def _write(content, name="m.gguf"):
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return _write


def expect_error(path, *fragments):
    with pytest.raises(GGUFError) as info:
        gguf.read(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# -- good files -----------------------------------------------------------------------------
def test_every_value_type_round_trips(tmp_path):
    meta = {
        "u8": Typed(V.UINT8, 255), "i8": Typed(V.INT8, -128), "u16": Typed(V.UINT16, 65535),
        "i16": Typed(V.INT16, -32768), "u32": Typed(V.UINT32, 2**32 - 1), "i32": Typed(V.INT32, -2**31),
        "u64": Typed(V.UINT64, 2**64 - 1), "i64": Typed(V.INT64, -2**63), "f32": Typed(V.FLOAT32, 0.5),
        "f64": Typed(V.FLOAT64, 1e300), "bool": True, "str": "héllo ✓", "empty": "",
        "arr_f32": Typed(V.FLOAT32, [0.25, -1.0]), "arr_str": ["a", "", "ü"], "arr_bool": [True, False],
        "nested": [[1, 2], [3]], "empty_arr": Typed(V.INT32, []),
        "general.alignment": 64,
    }
    data = np.arange(64, dtype=np.float32)
    write_gguf(tmp_path / "v.gguf", meta, [TensorSpec("t", GGMLType.F32, (8, 8), data)], alignment=64)
    f = gguf.read(tmp_path / "v.gguf")
    expected = {k: (v.value if isinstance(v, Typed) else v) for k, v in meta.items()}
    assert f.metadata == expected
    assert f.alignment == 64 and f.data_offset % 64 == 0 and f.tensor("t").offset % 64 == 0
    assert np.array_equal(f.tensor_data("t").view(np.float32).reshape(8, 8), data.reshape(8, 8))


def test_tensor_table_and_zero_copy_views(tmp_path, write):
    kvs, tensors, data = valid_parts()
    f = gguf.read(write(raw_file(kvs, tensors, data)))
    assert [t.name for t in f.tensors] == ["a", "b"]
    a = f.tensor("a")
    assert a.shape == (2, 4) and a.type == GGMLType.F32 and a.nbytes == 32 and a.n_elements == 8
    assert f.tensor("b").shape == (32,) and f.tensor("b").nbytes == TYPE_INFO[GGMLType.Q8_0].type_size
    view = f.tensor_data(a)
    assert not view.flags.writeable and not view.flags.owndata   # a view on the map, not a copy
    assert np.array_equal(view.view(np.float32), np.arange(8, dtype=np.float32))
    assert "a" in f and "zz" not in f
    with pytest.raises(KeyError, match="no tensor named 'zz'"):
        f.tensor("zz")
    assert "2 tensors" in f.summary() and "F32 x1" in f.summary()
    f.close()


def test_version_2_is_read(write):
    kvs, tensors, data = valid_parts()
    assert gguf.read(write(raw_file(kvs, tensors, data, version=2))).version == 2


def test_real_gemma3_270m_reads(gemma3_270m_path):
    """A second family's real file: Q4_K, Q5_0, Q6_K and Q8_0 weights and a 262144-token vocabulary. (The
    gguf package's reader takes a minute on it, so the check against another reader is llama.cpp's.)"""
    with gguf.read(gemma3_270m_path) as f:
        assert f.architecture == "gemma3" and len(f.tensors) == 236
        assert {t.type.name for t in f.tensors} == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
        assert f.metadata["gemma3.block_count"] == 18 and len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        assert f.tensor("token_embd.weight").shape == (262144, 640)
        spans = sorted((t.offset, t.offset + t.nbytes) for t in f.tensors)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert spans[-1][1] <= gemma3_270m_path.stat().st_size
        for t in f.tensors:
            rows = min(t.shape[0], 64) if len(t.shape) > 1 else t.shape[0]
            shape = (rows, *t.shape[1:])
            data = f.tensor_data(t)[:TYPE_INFO[t.type].row_bytes(int(np.prod(shape)))]
            assert np.isfinite(dequantize(data, t.type, shape)).all(), t.name
        scalars = {key: value for key, value in f.metadata.items() if not isinstance(value, list)}
    llama_cpp = pytest.importorskip("llama_cpp")
    theirs = llama_cpp.Llama(str(gemma3_270m_path), vocab_only=True, verbose=False).metadata
    assert set(theirs) == set(scalars)
    for key, value in scalars.items():
        if isinstance(value, float):
            assert float(theirs[key]) == pytest.approx(value, rel=1e-6, abs=1e-6), key
        else:
            assert theirs[key] == (str(value).lower() if isinstance(value, bool) else str(value)), key


def test_real_demo_model_matches_gguf_package(smollm2_path):
    reader = pytest.importorskip("gguf").GGUFReader(smollm2_path)
    with gguf.read(smollm2_path) as f:
        assert len(f.tensors) == len(reader.tensors) == 272
        for t in reader.tensors:
            mine = f.tensor(t.name)
            assert mine.shape == tuple(int(x) for x in reversed(t.shape))
            assert (mine.offset, mine.nbytes, int(mine.type)) == (int(t.data_offset), int(t.n_bytes), int(t.tensor_type))
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                assert f.metadata[key] == pytest.approx(field.contents()), key
        assert f.architecture == "llama"


def test_7b_sized_table_reads_fast_without_touching_data(tmp_path):
    """Zephyr-7B-shaped Q4_K_M: 291 tensors, a 32000-token vocab, 4.4 GB of (sparse) data."""
    shape = PRESETS["zephyr-7b"]
    tensors = llama_tensors(shape, "Q4_K_M")
    header = encode_header(llama_metadata(shape, minimal_llama_vocab(32000), "zephyr", "Q4_K_M"), tensors)
    path = tmp_path / "zephyr-7b.gguf"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(-(-t.nbytes // 32) * 32 for t in tensors))   # sparse: no data written
    start = time.perf_counter()
    model = gguf.read(path)
    elapsed = time.perf_counter() - start
    assert len(model.tensors) == 291 and len(model.metadata["tokenizer.ggml.tokens"]) == 32000
    assert sum(t.nbytes for t in model.tensors) > 4.0e9
    assert elapsed < 1.0, f"reading the header took {elapsed:.2f} s"


# -- malformed files ------------------------------------------------------------------------
def test_missing_and_empty_files(tmp_path, write):
    with pytest.raises(GGUFError, match="cannot open"):
        gguf.read(tmp_path / "nope.gguf")
    expect_error(write(b""), "empty")


def test_bad_magic(write):
    kvs, tensors, data = valid_parts()
    expect_error(write(raw_file(kvs, tensors, data, magic=b"GGML")), "bad magic", "byte offset 0")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(write, version):
    kvs, tensors, data = valid_parts()
    err = expect_error(write(raw_file(kvs, tensors, data, version=version)), f"unsupported GGUF version {version}")
    assert err.offset == 4


def test_truncated_header(write):
    expect_error(write(b"GGUF\x03\0\0\0\x01\0"), "truncated header")


def test_truncated_metadata(write):
    kvs, tensors, data = valid_parts()
    full = raw_file(kvs, tensors, data)
    cut = 24 + len(kvs[0]) + 10          # inside the second key/value pair
    expect_error(write(full[:cut]), "truncated")


def test_truncated_tensor_table(write):
    kvs, tensors, _ = valid_parts()
    head = b"GGUF" + struct.pack("<IQQ", 3, 2, 2) + b"".join(kvs) + tensors[0] + tensors[1][:9]
    expect_error(write(head), "truncated")


@pytest.mark.parametrize("field", ["kv", "tensors"])
def test_counts_larger_than_the_file(write, field):
    kvs, tensors, data = valid_parts()
    content = raw_file(kvs, tensors, data, **({"n_kv": 2**60} if field == "kv" else {"n_tensors": 2**40}))
    expect_error(write(content), "larger than the file could hold")


def test_string_length_larger_than_the_file(write):
    bad = struct.pack("<Q", 2**62) + b"abc"
    expect_error(write(raw_file([bad + struct.pack("<I", V.UINT8) + b"\0"])), "claims", "bytes")


def test_array_length_larger_than_the_file(write):
    payload = struct.pack("<IQ", V.FLOAT32, 2**61) + b"\0" * 16
    expect_error(write(raw_file([kv("big", V.ARRAY, payload)])), "array of", "larger than the rest of the file")
    payload = struct.pack("<IQ", V.STRING, 2**50) + b"\0" * 16
    expect_error(write(raw_file([kv("big", V.ARRAY, payload)])), "array length", "larger than the file")


def test_arrays_nested_too_deep(write):
    payload = b""
    for _ in range(20):
        payload = struct.pack("<IQ", V.ARRAY, 1) + payload
    payload = payload + struct.pack("<IQ", V.UINT8, 0)
    expect_error(write(raw_file([kv("deep", V.ARRAY, payload)])), "nested")


def test_unknown_value_type(write):
    expect_error(write(raw_file([kv("k", 99, b"\0" * 8)])), "unknown value type 99", "'k'")
    payload = struct.pack("<IQ", 42, 1) + b"\0" * 8
    expect_error(write(raw_file([kv("k", V.ARRAY, payload)])), "unknown value type 42")


def test_duplicate_key(write):
    kvs, tensors, data = valid_parts()
    expect_error(write(raw_file(kvs + [kvs[1]], tensors, data)), "duplicate metadata key 'x.count'")


def test_invalid_utf8(write):
    expect_error(write(raw_file([s(b"\xff\xfe") + struct.pack("<I", V.UINT8) + b"\0"])), "not valid UTF-8")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(write, alignment):
    kvs = [kv("general.alignment", V.UINT32, struct.pack("<I", alignment))]
    expect_error(write(raw_file(kvs)), "general.alignment must be a positive power of two")


def test_unknown_tensor_type(write):
    expect_error(write(raw_file([], [tinfo("w", (32,), 77, 0)], bytes(64))), "unknown ggml type 77", "'w'")


@pytest.mark.parametrize("dims", [(), (1, 1, 1, 1, 1), (0, 4)])
def test_bad_dimensions(write, dims):
    expect_error(write(raw_file([], [tinfo("w", dims, GGMLType.F32, 0)], bytes(64))), "'w'")


def test_row_not_a_multiple_of_the_block(write):
    expect_error(write(raw_file([], [tinfo("w", (48,), GGMLType.Q4_K, 0)], bytes(512))),
                 "not a multiple of the Q4_K block size 256")


def test_tensor_data_outside_the_file(write):
    kvs, tensors, data = valid_parts()
    expect_error(write(raw_file(kvs, tensors, data[:40])), "'b'", "outside the file")
    huge = [tinfo("w", (2**40, 2**20), GGMLType.F32, 0)]
    expect_error(write(raw_file([], huge, bytes(64))), "'w'")


def test_misaligned_offset(write):
    expect_error(write(raw_file([], [tinfo("w", (4,), GGMLType.F32, 4)], bytes(64))), "not aligned to 32")


def test_duplicate_tensor_names(write):
    tensors = [tinfo("w", (8,), GGMLType.F32, 0), tinfo("w", (8,), GGMLType.F32, 32)]
    expect_error(write(raw_file([], tensors, bytes(64))), "duplicate tensor name 'w'")


def test_overlapping_tensors(write):
    tensors = [tinfo("a", (16,), GGMLType.F32, 0), tinfo("b", (16,), GGMLType.F32, 32)]
    expect_error(write(raw_file([], tensors, bytes(128))), "overlap")
