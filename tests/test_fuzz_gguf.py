"""Hostile model files: every malformed GGUF must end in a zephyr error with a useful message.

Never a segfault, a hang, another exception type, or an allocation of what the file merely claims:
each case runs in a child process (tests/support/fuzz_worker.py) that has its address space capped and is
watched for crashes and timeouts. The cases:

* a structure-aware mutation corpus: the fields of two real files (a tiny synthetic Q4_K_M model
  and the header of the SmolLM2 demo model) are found by parsing, then the file is truncated at
  every field boundary, and every count, length, type, dimension and offset is set to hostile
  values (0, off by one, 2^32, 2^63, 2^64-1, other types, overlapping or out-of-file offsets);
* random byte flips in the header;
* semantically wrong files that parse fine: metadata of the wrong type or value for known keys,
  tensors of the wrong shape or type, vocabularies that disagree with the embedding;
* hypothesis strategies over metadata values and tensor tables.

ZEPHYR_FUZZ_SCALE=N (default 1) multiplies the random and hypothesis cases and includes every
array element as a field; see docs/security.md for a long run.
"""
import os
import random
import struct
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.fuzz_worker import UNDER_ASAN, FuzzWorker
from zephyr.gguf import GGUFValueType as V
from zephyr.testing.gguf_writer import TensorSpec, Typed, write_gguf
from zephyr.quants import TYPE_INFO, GGMLType
from zephyr.testing.synthetic import PRESETS, llama_metadata, llama_tensors, minimal_llama_vocab

SCALE = max(1, int(os.environ.get("ZEPHYR_FUZZ_SCALE", "1")))
SHAPE = replace(PRESETS["tiny"], vocab_size=300)   # tiny preset, small vocabulary: fast to load
LAYOUT = "Q4_K_M"


# ---- the files -----------------------------------------------------------------------------------

def model_parts(meta_edits=None, vocab=None):
    """(metadata, tensor specs) of the tiny synthetic model, with `meta_edits` applied (None deletes)."""
    meta = llama_metadata(SHAPE, vocab or minimal_llama_vocab(SHAPE.vocab_size), "fuzz", LAYOUT)
    for key, value in (meta_edits or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return meta, llama_tensors(SHAPE, LAYOUT)


def model_bytes(tmp_path, meta_edits=None, tensors=None, vocab=None) -> bytes:
    meta, specs = model_parts(meta_edits, vocab)
    path = tmp_path / "build.gguf"
    write_gguf(path, meta, specs if tensors is None else tensors(specs))
    return path.read_bytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return model_bytes(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def worker(tmp_path_factory, security_tally):
    directory = tmp_path_factory.mktemp("fuzz")
    warmup = directory / "warmup.gguf"
    warmup.write_bytes(model_bytes(directory))
    fuzz = FuzzWorker(directory, warmup)
    yield fuzz
    fuzz.close()
    security_tally["GGUF files fuzzed"] = fuzz.cases
    security_tally["... of which loaded and generated"] = fuzz.loaded


def check(outcome, label):
    """The outcome is clean; errors in the reader are GGUFErrors naming the file."""
    assert outcome.status not in ("crash", "hang"), f"{label}: {outcome.status}\n{outcome.message}"
    assert outcome.acceptable, f"{label}: {outcome.stage} raised {outcome.type}: {outcome.message}"
    if outcome.status == "error" and outcome.stage == "read":
        assert outcome.type == "GGUFError" and ".gguf" in outcome.message, f"{label}: {outcome.message}"
    return outcome


def test_the_worker_notices_crashes_hangs_and_huge_allocations(worker, tiny):
    assert worker.run(tiny, mode="crash").status == "crash"
    timeout, worker.timeout = worker.timeout, 3
    try:
        assert worker.run(tiny, mode="hang").status == "hang"
    finally:
        worker.timeout = timeout
    if not UNDER_ASAN:
        refused = worker.run(tiny, mode="allocate")
        assert refused.type == "MemoryError" and not refused.acceptable
    assert worker.run(tiny).status == "ok"    # restarted after each


# ---- finding the structure by parsing --------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    # magic, version, count, strlen, strbytes, vtype, scalar, itemtype, arrcount, ndims, dim, ttype,
    # toffset, padding or tdata
    kind: str
    label: str
    element: int = 0  # index within an array (elements past the first few are sampled)
    value_type: int = -1


def parse_fields(buf: bytes):
    """Every field of a GGUF file, found independently of zephyr.gguf."""
    fields, pos = [], 0

    def take(size, kind, label, **extra):
        nonlocal pos
        fields.append(Field(pos, size, kind, label, **extra))
        pos += size
        return buf[pos - size:pos]

    def u32(raw):
        return struct.unpack("<I", raw)[0]

    def u64(raw):
        return struct.unpack("<Q", raw)[0]

    def string(label, **extra):
        length = u64(take(8, "strlen", label, **extra))
        return take(length, "strbytes", label, **extra).decode()

    def value(vtype, label, element=0):
        if vtype == V.STRING:
            string(label, element=element)
        elif vtype == V.ARRAY:
            item = u32(take(4, "itemtype", label, element=element))
            count = u64(take(8, "arrcount", label, element=element))
            for i in range(count):
                value(item, f"{label}[{i}]", element=i)
        else:
            size = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}[vtype]
            take(size, "scalar", label, element=element, value_type=vtype)

    take(4, "magic", "magic")
    take(4, "version", "version")
    n_tensors = u64(take(8, "count", "tensor count"))
    n_kv = u64(take(8, "count", "metadata count"))
    alignment = 32
    for _ in range(n_kv):
        key = string("key")
        vtype = u32(take(4, "vtype", f"{key} type"))
        start = pos
        value(vtype, key)
        if key == "general.alignment":
            alignment = u32(buf[start:start + 4])
    tensors = []
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims = u32(take(4, "ndims", f"{name} dims"))
        dims = [u64(take(8, "dim", f"{name} dim {i}")) for i in range(n_dims)]
        ttype = u32(take(4, "ttype", f"{name} type"))
        offset = u64(take(8, "toffset", f"{name} offset"))
        info = TYPE_INFO[GGMLType(ttype)]
        tensors.append((name, offset, int(np.prod(dims)) // info.block_size * info.type_size))
    data_offset = -(-pos // alignment) * alignment
    if data_offset > pos:
        take(data_offset - pos, "padding", "padding")
    for name, offset, nbytes in tensors:
        fields.append(Field(data_offset + offset, nbytes, "tdata", name))
    return fields, data_offset


def sampled(fields):
    """All fields at scale >= 10; otherwise the first two and the last element of every array."""
    if SCALE >= 10:
        return fields
    last = {}
    for f in fields:
        base = f.label.split("[")[0]
        last[base] = max(last.get(base, 0), f.element)
    return [f for f in fields if f.element < 2 or f.element == last[f.label.split("[")[0]]]


# ---- mutations of one field -------------------------------------------------------------------------

ALL_GGML_TYPES = [int(t) for t in GGMLType] + [4, 5, 31, 99, 2**32 - 1]
# Every type for these tensors; a few telling ones for the rest (all of them at ZEPHYR_FUZZ_SCALE > 1).
KEY_TENSORS = ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight", "output.weight")
SOME_GGML_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.IQ2_XXS, GGMLType.I8, 99]
HUGE = [2**63, 2**64 - 1] if SCALE == 1 else [2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]


def hostile_values(field, original, file_size):
    """Values to write into a numeric field, chosen to break what the reader assumes about it."""
    if field.kind == "magic":
        return [b"GGML", b"\0\0\0\0", b"FUGG"]
    if field.kind == "version":
        return [0, 1, 4, 2**32 - 1]
    if field.kind in ("vtype", "itemtype"):
        return [t for t in range(14) if t != original] + [2**32 - 1]
    if field.kind == "ttype":
        every = SCALE > 1 or field.label.removesuffix(" type") in KEY_TENSORS
        return [int(t) for t in (ALL_GGML_TYPES if every else SOME_GGML_TYPES) if t != original]
    if field.kind == "ndims":
        return [0, 1, 2, 3, 4, 5, 2**32 - 1]
    if field.kind == "dim":
        return [0, original + 1, original * 2, max(1, original // 2), 2**32, *HUGE]
    if field.kind == "toffset":
        return [0, original + 1, original + 32, max(0, original - 32), file_size, *HUGE]
    if field.kind in ("count", "arrcount", "strlen"):
        return [0, max(0, original - 1), original + 1, file_size, *HUGE]
    if field.kind == "scalar":
        if field.value_type in (V.FLOAT32, V.FLOAT64):
            return [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e38]
        return [0, 1, 2**(8 * field.size) - 1, 2**(8 * field.size - 1), 3]
    return []


def encode(field, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return struct.pack("<f" if field.size == 4 else "<d", value)
    value &= (1 << 8 * field.size) - 1
    return value.to_bytes(field.size, "little")


@dataclass(frozen=True)
class Mutation:
    label: str
    offset: int
    replacement: bytes = None   # None: truncate the file at `offset`
    must_fail: bool = False     # no honest reader could accept the result

    def apply(self, buf: bytes) -> bytes:
        if self.replacement is None:
            return buf[:self.offset]
        return buf[:self.offset] + self.replacement + buf[self.offset + len(self.replacement):]


def mutations(buf, fields):
    """Every truncation at a field boundary and every hostile value of every field."""
    end_of_data = max(f.offset + f.size for f in fields)
    for f in fields:
        for cut in sorted({f.offset, f.offset + f.size - 1, f.offset + f.size // 2}):
            if 0 <= cut < len(buf):
                yield Mutation(f"truncated at {cut} ({f.kind} {f.label})", cut, must_fail=cut < end_of_data)
        original = int.from_bytes(buf[f.offset:f.offset + f.size], "little") if f.size <= 8 else 0
        for value in hostile_values(f, original, len(buf)):
            raw = encode(f, value)
            if raw != buf[f.offset:f.offset + f.size]:
                yield Mutation(f"{f.kind} {f.label} = {value!r}", f.offset, raw, f.kind in ("magic", "version"))
        if f.kind == "strbytes" and f.size:
            for bad in (b"\xff", b"\xc3", b"X"):
                yield Mutation(f"{f.label} bytes start {bad!r}", f.offset, bad)
        if f.kind == "padding":
            yield Mutation("garbage padding", f.offset, b"\xff" * f.size)


# ---- the corpus on the synthetic model ----------------------------------------------------------------

def test_every_field_of_the_synthetic_model_truncated_and_corrupted(worker, tiny):
    fields, _ = parse_fields(tiny)
    count = 0
    for mutation in mutations(tiny, sampled(fields)):
        outcome = check(worker.run(mutation.apply(tiny)), mutation.label)
        if mutation.must_fail:
            assert outcome.status == "error", f"{mutation.label}: accepted"
        count += 1
    assert count > 2000


def test_norms_and_weights_full_of_nan_or_garbage(worker, tiny):
    fields, _ = parse_fields(tiny)
    data = {f.label: f for f in fields if f.kind == "tdata"}
    rng = np.random.default_rng(0)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_down.weight", "token_embd.weight",
                 "output.weight", "blk.0.attn_q.weight"):
        f = data[name]
        fills = {"nan": np.full(f.size // 4, np.nan, np.float32).tobytes(),
                 "inf": np.full(f.size // 4, np.inf, np.float32).tobytes(),
                 "0xff": b"\xff" * f.size,
                 "random": rng.integers(0, 256, f.size, dtype=np.uint8).tobytes()}
        for fill, raw in fills.items():
            check(worker.run(tiny[:f.offset] + raw + tiny[f.offset + f.size:]), f"{name} filled with {fill}")


def test_random_byte_flips_in_the_header(worker, tiny):
    _, data_offset = parse_fields(tiny)
    rng = random.Random(1234)
    for case in range(150 * SCALE):
        buf = bytearray(tiny)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(data_offset)
            flipped = buf[position] ^ (1 << rng.randrange(8))
            buf[position] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256), flipped])
        check(worker.run(bytes(buf)), f"random flips, case {case}")


@pytest.mark.parametrize("item_type, count", [(V.UINT8, 200_000_000), (V.FLOAT32, 10_000_000),
                                               (V.STRING, 20_000_000), (V.ARRAY, 10_000_000)])
def test_metadata_that_would_decode_into_gigabytes(worker, item_type, count):
    """A file really holding a huge metadata array (a sparse hole of zeros here): decoded, 200 MB of
    bytes would be 1.6 GB of Python objects. Refused instead, by the value count."""
    item = struct.pack("<IQ", V.UINT8, 0) if item_type == V.ARRAY else b""   # arrays of empty arrays
    header = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"big"
              + struct.pack("<IIQ", V.ARRAY, item_type, count) + item)
    item_size = {V.UINT8: 1, V.FLOAT32: 4, V.STRING: 8, V.ARRAY: 12}[item_type]
    outcome = check(worker.run(header, mode="read", size=len(header) - len(item) + count * item_size), "big array")
    assert outcome.status == "error" and "more than 8,388,608 values" in outcome.message, outcome


@pytest.mark.parametrize("what", ["keys", "tensors"])
def test_more_keys_or_tensors_than_any_model_has(worker, what):
    """70,000 of either (real files: tens of keys, a few thousand tensors) would cost seconds to parse."""
    n = 70_000
    if what == "keys":
        body = b"".join(struct.pack("<Q", 8) + b"%08x" % i + struct.pack("<I", V.UINT8) + b"\0" for i in range(n))
        content, size = b"GGUF" + struct.pack("<IQQ", 3, 0, n) + body, None
    else:
        body = b"".join(struct.pack("<Q", 8) + b"%08x" % i + struct.pack("<IQIQ", 1, 8, GGMLType.F32, 32 * i)
                        for i in range(n))
        content = b"GGUF" + struct.pack("<IQQ", 3, n, 0) + body
        size = len(content) + 32 + 32 * n
    outcome = check(worker.run(content, mode="read", size=size), what)
    assert outcome.status == "error" and "zephyr reads files of up to 65,536 keys" in outcome.message, outcome


# ---- the real demo model's header ---------------------------------------------------------------

def test_demo_model_header_truncated_and_corrupted(worker, smollm2_path):
    """The real file's header (vocabulary, merges, template, 272 tensor infos); the tensor data is a
    sparse hole of zeros, so each case costs a header, not 98 MB."""
    full_size = os.path.getsize(smollm2_path)
    with open(smollm2_path, "rb") as f:
        head = f.read(2 << 20)
    fields, data_offset = parse_fields(head)
    head = head[:data_offset]
    header_fields = [f for f in fields if f.kind != "tdata"]
    structural = [f for f in sampled(header_fields) if f.element == 0 or f.kind in ("arrcount", "itemtype")]
    rng = random.Random(7)
    chosen = rng.sample(list(mutations(head, structural)), 50 * SCALE)
    for mutation in chosen:
        content = mutation.apply(head)
        size = full_size if len(content) == len(head) else None   # truncations stay truncated
        outcome = check(worker.run(content, mode="read", size=size), mutation.label)
        if mutation.must_fail:
            assert outcome.status == "error", f"{mutation.label}: accepted"
    assert worker.run(head, size=full_size).status == "ok"


# ---- files that parse but describe an impossible model ----------------------------------------------

BAD_METADATA = {
    "block_count as a string": {"llama.block_count": "2"},
    "block_count as a float": {"llama.block_count": 2.0},
    "block_count 0": {"llama.block_count": 0},
    "block_count -1": {"llama.block_count": Typed(V.INT32, -1)},
    "block_count 3 (a block missing)": {"llama.block_count": 3},
    "block_count 2^40": {"llama.block_count": Typed(V.UINT64, 2**40)},
    "block_count 2^64-1": {"llama.block_count": Typed(V.UINT64, 2**64 - 1)},
    "block_count missing": {"llama.block_count": None},
    "block_count as an array": {"llama.block_count": [2, 2]},
    "head_count 0": {"llama.attention.head_count": 0},
    "head_count 3 (does not divide 256)": {"llama.attention.head_count": 3},
    "head_count 8 (wrong head size)": {"llama.attention.head_count": 8, "llama.rope.dimension_count": 32},
    "head_count 2^32-1": {"llama.attention.head_count": Typed(V.UINT32, 2**32 - 1)},
    "head_count_kv 0": {"llama.attention.head_count_kv": 0},
    "head_count_kv 3": {"llama.attention.head_count_kv": 3},
    "head_count_kv 8 (more than heads)": {"llama.attention.head_count_kv": 8},
    "head_count_kv as bool": {"llama.attention.head_count_kv": True},
    "rope dims odd": {"llama.rope.dimension_count": 63},
    "rope dims larger than a head": {"llama.rope.dimension_count": 128},
    "rope dims 0": {"llama.rope.dimension_count": 0},
    "rope base NaN": {"llama.rope.freq_base": float("nan")},
    "rope base inf": {"llama.rope.freq_base": float("inf")},
    "rope base -1": {"llama.rope.freq_base": -1.0},
    "rope base a string": {"llama.rope.freq_base": "10000"},
    "rms eps 0": {"llama.attention.layer_norm_rms_epsilon": 0.0},
    "rms eps NaN": {"llama.attention.layer_norm_rms_epsilon": float("nan")},
    "sliding window -1": {"llama.attention.sliding_window": Typed(V.INT32, -1)},
    "embedding_length 255": {"llama.embedding_length": 255},
    "embedding_length 512": {"llama.embedding_length": 512},
    "embedding_length 2^63": {"llama.embedding_length": Typed(V.UINT64, 2**63)},
    "feed_forward_length 0": {"llama.feed_forward_length": 0},
    "feed_forward_length 511": {"llama.feed_forward_length": 511},
    "feed_forward_length 2^62": {"llama.feed_forward_length": Typed(V.UINT64, 2**62)},
    "context_length 0": {"llama.context_length": 0},
    "context_length -5": {"llama.context_length": Typed(V.INT32, -5)},
    "architecture missing": {"general.architecture": None},
    "architecture gpt2": {"general.architecture": "gpt2"},
    "architecture an integer": {"general.architecture": 7},
    "architecture a list": {"general.architecture": ["llama"]},
    "tokenizer model missing": {"tokenizer.ggml.model": None},
    "tokenizer model bert": {"tokenizer.ggml.model": "bert"},
    "tokens missing": {"tokenizer.ggml.tokens": None},
    "tokens of integers": {"tokenizer.ggml.tokens": list(range(300))},
    "tokens one short of the scores": {"tokenizer.ggml.tokens": minimal_llama_vocab(300)[0][:299]},
    "scores one short": {"tokenizer.ggml.scores": Typed(V.FLOAT32, minimal_llama_vocab(300)[1][:299])},
    "scores missing": {"tokenizer.ggml.scores": None},
    "scores of strings": {"tokenizer.ggml.scores": ["0"] * 300},
    "token types one too many": {"tokenizer.ggml.token_type": Typed(V.INT32, minimal_llama_vocab(300)[2] + [1])},
    "token type 99": {"tokenizer.ggml.token_type": Typed(V.INT32, [99] + minimal_llama_vocab(300)[2][1:])},
    "bos id out of range": {"tokenizer.ggml.bos_token_id": 300},
    "eos id -1": {"tokenizer.ggml.eos_token_id": Typed(V.INT32, -1)},
    "unknown id 2^40": {"tokenizer.ggml.unknown_token_id": Typed(V.UINT64, 2**40)},
    "eot id a string": {"tokenizer.ggml.eot_token_id": "2"},
    "pre-tokenizer unknown (gpt2)": {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "nope"},
    "gpt2 without merges": {"tokenizer.ggml.model": "gpt2"},
    "gpt2 merges not in vocabulary": {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["zz qq"]},
    "add_bos_token a string (accepted)": {"tokenizer.ggml.add_bos_token": "yes"},
    "chat template an integer (accepted: chat() reports it)": {"tokenizer.chat_template": 5},
    "alignment 0": {"general.alignment": Typed(V.UINT32, 0)},
    "alignment 48": {"general.alignment": Typed(V.UINT32, 48)},
    "alignment 2^31": {"general.alignment": Typed(V.UINT32, 2**31)},
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_metadata_of_the_wrong_type_or_value(worker, tmp_path, case):
    """Refused while loading, before anything is sized from the bad value or a kernel runs on it."""
    outcome = check(worker.run(model_bytes(tmp_path, BAD_METADATA[case])), case)
    if "accepted" in case:
        assert outcome.status == "ok", outcome
    else:
        assert outcome.status == "error" and outcome.stage in ("read", "load"), outcome


def _vocab_with(index, token, kind):
    tokens, scores, types = (list(x) for x in minimal_llama_vocab(SHAPE.vocab_size))
    tokens[index], types[index] = token, kind
    return tokens, scores, types


BAD_VOCABULARIES = {
    "empty control token": _vocab_with(299, "", 3),
    "empty normal token": _vocab_with(299, "", 1),
    "empty user-defined token": _vocab_with(299, "", 4),
    "duplicate tokens": _vocab_with(299, "\u2581e", 1),
    "a megabyte-long token": _vocab_with(299, "a" * (1 << 20), 1),
    "a megabyte-long control token": _vocab_with(299, "<" * (1 << 20), 3),
    "one token fewer than embedding rows (refused)": minimal_llama_vocab(SHAPE.vocab_size - 1),
    "one token more than embedding rows (refused)": minimal_llama_vocab(SHAPE.vocab_size + 1),
    "byte token not <0xNN> (refused)": _vocab_with(10, "<0xZZ>", 6),
}


@pytest.mark.parametrize("case", BAD_VOCABULARIES)
def test_hostile_vocabularies(worker, tmp_path, case):
    outcome = check(worker.run(model_bytes(tmp_path, vocab=BAD_VOCABULARIES[case])), case)
    if "refused" in case:
        assert outcome.status == "error" and outcome.stage == "load", outcome


def _retyped(name, ggml_type=None, shape=None, drop=False):
    """Tensor specs with `name` given another type and/or shape (random bytes of the right size), or dropped."""
    def edit(specs):
        out = []
        for spec in specs:
            if spec.name == name:
                if drop:
                    continue
                t = GGMLType(ggml_type) if ggml_type is not None else spec.type
                new_shape = shape or spec.shape
                nbytes = TensorSpec(name, t, new_shape, b"").nbytes
                spec = TensorSpec(name, t, new_shape, np.random.default_rng(0).integers(0, 256, nbytes, np.uint8))
            out.append(spec)
        return out
    return edit


BAD_TENSORS = {
    "attn_q with the wrong shape": _retyped("blk.0.attn_q.weight", shape=(256, 512)),
    "attn_q transposed": _retyped("blk.0.attn_k.weight", shape=(256, 128), ggml_type=GGMLType.F32),
    "attn_q three-dimensional": _retyped("blk.0.attn_q.weight", shape=(1, 256, 256)),
    "attn_q a vector": _retyped("blk.0.attn_q.weight", shape=(256,), ggml_type=GGMLType.F32),
    "attn_q of type IQ2_XXS": _retyped("blk.0.attn_q.weight", ggml_type=GGMLType.IQ2_XXS),
    "attn_q of type Q8_K": _retyped("blk.0.attn_q.weight", ggml_type=GGMLType.Q8_K),
    "attn_q of type I32": _retyped("blk.0.attn_q.weight", ggml_type=GGMLType.I32),
    "attn_q of type F64": _retyped("blk.0.attn_q.weight", ggml_type=GGMLType.F64),
    "attn_q of type MXFP4": _retyped("blk.0.attn_q.weight", ggml_type=GGMLType.MXFP4),
    "norm stored as Q4_0": _retyped("blk.0.attn_norm.weight", ggml_type=GGMLType.Q4_0),
    "norm stored as F16": _retyped("output_norm.weight", ggml_type=GGMLType.F16),
    "norm of the wrong length": _retyped("blk.1.ffn_norm.weight", shape=(128,)),
    "norm as a column": _retyped("blk.1.ffn_norm.weight", shape=(256, 1)),
    "norm as a row (accepted)": _retyped("blk.1.ffn_norm.weight", shape=(1, 256)),
    "token_embd of the wrong width": _retyped("token_embd.weight", shape=(300, 512)),
    "token_embd with more rows than tokens": _retyped("token_embd.weight", shape=(512, 256)),
    "token_embd a vector": _retyped("token_embd.weight", shape=(256,), ggml_type=GGMLType.F32),
    "output of the wrong vocabulary": _retyped("output.weight", shape=(256, 256)),
    "output missing (tied, accepted)": _retyped("output.weight", drop=True),
    "output_norm missing": _retyped("output_norm.weight", drop=True),
    "token_embd missing": _retyped("token_embd.weight", drop=True),
    "ffn_down of the last block missing": _retyped("blk.1.ffn_down.weight", drop=True),
    "ffn_up as F16 (accepted)": _retyped("blk.1.ffn_up.weight", ggml_type=GGMLType.F16),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_tensors_of_the_wrong_shape_or_type(worker, tmp_path, case):
    outcome = check(worker.run(model_bytes(tmp_path, tensors=BAD_TENSORS[case])), case)
    if "accepted" in case:   # loads; its random bytes may still hold NaNs, which generation refuses
        assert outcome.status == "ok" or "non-finite logits" in outcome.message, outcome
    else:
        assert outcome.status == "error" and outcome.stage in ("read", "load"), outcome


# ---- hypothesis: metadata values and tensor tables -----------------------------------------------------

KNOWN_KEYS = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.context_length",
              "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
              "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.attention.sliding_window",
              "general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens", "tokenizer.ggml.pre",
              "tokenizer.ggml.merges", "tokenizer.chat_template"]

INTEGER_TYPES = {V.UINT8: (0, 2**8 - 1), V.INT8: (-2**7, 2**7 - 1), V.UINT16: (0, 2**16 - 1),
                 V.INT16: (-2**15, 2**15 - 1), V.UINT32: (0, 2**32 - 1), V.INT32: (-2**31, 2**31 - 1),
                 V.UINT64: (0, 2**64 - 1), V.INT64: (-2**63, 2**63 - 1)}


@st.composite
def metadata_values(draw):
    kind = draw(st.sampled_from(["int", "float", "bool", "str", "int array", "str array", "float array", "nested"]))
    if kind == "int":
        vtype = draw(st.sampled_from(list(INTEGER_TYPES)))
        low, high = INTEGER_TYPES[vtype]
        return Typed(vtype, draw(st.one_of(st.integers(low, high), st.sampled_from([low, high, 0, 1, 2, 4, 64, 300]))))
    if kind == "float":
        return Typed(draw(st.sampled_from([V.FLOAT32, V.FLOAT64])), draw(st.floats(width=32)))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "str":
        return draw(st.text(max_size=20))
    if kind == "int array":
        return Typed(V.INT32, draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=400)))
    if kind == "float array":
        return Typed(V.FLOAT32, draw(st.lists(st.floats(width=32), max_size=400)))
    if kind == "str array":
        return Typed(V.STRING, draw(st.lists(st.text(max_size=8), max_size=400)))
    return [[1, 2], [3]]


FUZZ_SETTINGS = settings(max_examples=30 * SCALE, deadline=None, derandomize=SCALE == 1,
                         suppress_health_check=list(HealthCheck))


@FUZZ_SETTINGS
@given(edits=st.dictionaries(st.sampled_from(KNOWN_KEYS), st.one_of(st.none(), metadata_values()),
                             min_size=1, max_size=4))
def test_hypothesis_metadata(worker, tmp_path_factory, edits):
    check(worker.run(model_bytes(tmp_path_factory.mktemp("h"), edits)), f"metadata {edits!r:.300}")


TENSOR_NAMES = [s.name for s in llama_tensors(SHAPE, LAYOUT)]
SHAPES = [(256,), (1, 256), (256, 256), (128, 256), (512, 256), (256, 512), (300, 256), (32, 32), (1, 1, 256),
          (2, 128, 256), (256, 1)]


@FUZZ_SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(TENSOR_NAMES), st.one_of(st.none(), st.sampled_from(list(GGMLType))),
                                  st.one_of(st.none(), st.sampled_from(SHAPES)), st.booleans()),
                        min_size=1, max_size=3))
def test_hypothesis_tensor_tables(worker, tmp_path_factory, changes):
    def edit(specs):
        for name, ggml_type, shape, drop in changes:
            specs = _retyped(name, ggml_type, shape, drop)(specs)
        return specs
    check(worker.run(model_bytes(tmp_path_factory.mktemp("h"), tensors=edit)), f"tensors {changes}")


@FUZZ_SETTINGS
@given(data=st.data())
def test_hypothesis_header_splices(worker, tiny, data):
    """Overwrite, insert or delete a few bytes anywhere in the header."""
    _, data_offset = parse_fields(tiny)
    buf = bytearray(tiny)
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.integers(0, data_offset - 1))
        action = data.draw(st.sampled_from(["overwrite", "insert", "delete"]))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        if action == "overwrite":
            buf[position:position + len(chunk)] = chunk
        elif action == "insert":
            buf[position:position] = chunk
        else:
            del buf[position:position + len(chunk)]
    check(worker.run(bytes(buf)), "splice")
