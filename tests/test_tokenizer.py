"""zephyr.tokenizer against reference tokenizers.

- llama kind: Mistral's tokenizer.model.v1 (Zephyr-7B-beta's vocabulary), compared live with
  sentencepiece and with llama.cpp's recorded ids (tests/data/mistral_reference_ids.json).
- gpt2 kind: the real SmolLM2 GGUF against llama.cpp's recorded ids (and live when llama-cpp-python
  is installed), and one probe vocabulary per pre-tokenizer kind against recorded ids.
- Gemma 3 270M's real 262144-token llama vocabulary against llama.cpp's recorded ids (and live).
- both kinds: the reachable part of llama.cpp's own test vocabularies (Falcon, MPT, DeepSeek, Command-R,
  Qwen2, Llama 3, Phi-3, ...) against llama.cpp's recorded ids, and live when it is installed.
The recordings come from tests/data/make_reference_ids.py and make_llama_cpp_vocabs.py, which say how
to regenerate them.
"""
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

from zephyr import gguf
from zephyr.errors import TokenizerError
from zephyr.testing.spm_model import read_spm_model
from zephyr.tokenizer import SUPPORTED_PRE_TOKENIZERS, Tokenizer

DATA = Path(__file__).parent / "data"
TEXTS = json.loads((DATA / "tokenizer_texts.json").read_text(encoding="utf-8"))["texts"]

# Texts whose round trip is lossy by design.
LLAMA_LOSSY = {"▁ literal metaspace ▁▁"}              # "▁" is how the vocabulary writes a space
# bytes 0x04, 0x13, 0x14 and 0x1D have no token: dropped
SMOLLM2_LOSSY = {"a\x04b \x13\x14 control characters", "ascii separators \x0b\x0c\x1c\x1d\x1e\x1f end"}


def _load(name):
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=None)
def _probe_vocab():
    return _reference_script().probe_vocab(TEXTS)


def _reference_script():
    spec = importlib.util.spec_from_file_location("make_reference_ids", DATA / "make_reference_ids.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _by_text(reference):
    entries = reference["entries"]
    assert [e["text"] for e in entries] == TEXTS, "texts changed: rerun tests/data/make_reference_ids.py"
    return entries


def _mistral_metadata(path, **overrides):
    tokens, scores, types = read_spm_model(path)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    meta.update({f"tokenizer.ggml.{k}": v for k, v in overrides.items()})
    return meta


@pytest.fixture(scope="module")
def mistral(mistral_vocab_path):
    return Tokenizer.from_metadata(_mistral_metadata(mistral_vocab_path))


@pytest.fixture(scope="module")
def sp(mistral_vocab_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_vocab_path))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def live_llama_cpp(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(smollm2_path), vocab_only=True, verbose=False)


def _probe_metadata(pre):
    tokens, types, merges = _probe_vocab()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False}


# --- llama (SentencePiece) vocabulary -------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_llama_matches_sentencepiece(mistral, sp, text):
    assert mistral.encode(text, add_bos=False) == sp.encode(text)
    assert mistral.encode(text) == [sp.bos_id()] + sp.encode(text)


def test_llama_matches_llama_cpp_recording(mistral):
    for entry in _by_text(_load("mistral_reference_ids.json")):
        text = entry["text"]
        assert mistral.encode(text) == entry["ids"], text
        assert mistral.encode(text, special=True) == entry["ids_special"], text
        assert mistral.decode(entry["ids"]) == entry["decoded"], text
        assert mistral.decode(entry["ids_special"], special=True) == entry["decoded_special"], text


@pytest.mark.parametrize("text", TEXTS)
def test_llama_round_trip(mistral, text):
    if text in LLAMA_LOSSY:
        pytest.skip("lossy by design")
    assert mistral.decode(mistral.encode(text)) == text
    assert mistral.decode(mistral.encode(text, add_bos=False)) == text


def test_llama_space_prefix_and_byte_fallback(mistral):
    hello = mistral.token_to_id("▁Hello")
    assert mistral.encode("Hello") == [1, hello]
    # "🦩" has no piece: four <0xNN> byte tokens
    assert mistral.encode("🦩", add_bos=False)[1:] == [mistral.token_to_id(f"<0x{b:02X}>") for b in "🦩".encode()]
    assert mistral.decode([hello]) == "Hello"             # the prefix space goes ...
    assert mistral.decode([hello, hello]) == "Hello Hello"  # ... only at the start


def test_llama_without_space_prefix(mistral_vocab_path):
    tok = Tokenizer.from_metadata(_mistral_metadata(mistral_vocab_path, add_space_prefix=False))
    assert tok.encode("Hello", add_bos=False) == [tok.token_to_id("Hello")]
    assert tok.decode(tok.encode(" Hello world")) == " Hello world"


def test_llama_special_tokens(mistral):
    # as text: "<s>" is pieces; with special=True it is the control token (and text after it gets a "▁")
    assert 1 not in mistral.encode("<s>", add_bos=False)
    assert mistral.encode("<s>Hi", add_bos=False, special=True) == [1, mistral.token_to_id("▁Hi")]
    assert mistral.encode("<unk>", add_bos=False, special=True) == [0]
    ids = [1, mistral.token_to_id("▁Hi"), 2]
    assert mistral.decode(ids) == "Hi"
    assert mistral.decode(ids, special=True) == "<s> Hi</s>"
    assert mistral.is_special(1) and mistral.is_special(0) and not mistral.is_special(ids[1])
    assert not mistral.is_special(mistral.token_to_id("<0x41>"))


def test_llama_properties(mistral):
    assert mistral.model == "llama" and mistral.pre is None
    assert mistral.vocab_size == 32000
    assert (mistral.bos_id, mistral.eos_id) == (1, 2)
    assert mistral.eog_ids == {2} and mistral.is_eog(2) and not mistral.is_eog(1)
    assert mistral.add_bos
    assert mistral.id_to_token(1) == "<s>" and mistral.token_to_id("</s>") == 2
    assert mistral.token_to_id("no such token") is None


def test_add_eos_token(mistral_vocab_path):
    tok = Tokenizer.from_metadata(_mistral_metadata(mistral_vocab_path, add_eos_token=True, add_bos_token=False))
    assert tok.encode("Hi") == [tok.token_to_id("▁Hi"), 2]
    assert tok.encode("Hi", add_bos=True) == [1, tok.token_to_id("▁Hi"), 2]


# --- gpt2 (byte-level BPE) vocabulary ---------------------------------------------------------------

def test_smollm2_matches_llama_cpp_recording(smollm2):
    for entry in _by_text(_load("smollm2_reference_ids.json")):
        text = entry["text"]
        assert smollm2.encode(text) == entry["ids"], text
        assert smollm2.encode(text, special=True) == entry["ids_special"], text
        assert smollm2.decode(entry["ids"]) == entry["decoded"], text
        assert smollm2.decode(entry["ids_special"], special=True) == entry["decoded_special"], text


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_matches_live_llama_cpp(smollm2, live_llama_cpp, text):
    for special in (False, True):
        expected = live_llama_cpp.tokenize(text.encode(), add_bos=False, special=special)
        assert smollm2.encode(text, special=special) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2, text):
    if text in SMOLLM2_LOSSY:
        pytest.skip("lossy by design")
    assert smollm2.decode(smollm2.encode(text)) == text


def test_smollm2_special_tokens(smollm2):
    im_start, user = smollm2.token_to_id("<|im_start|>"), smollm2.token_to_id("user")
    assert smollm2.encode("<|im_start|>user", special=True) == [im_start, user]
    as_text = smollm2.encode("<|im_start|>user")
    assert im_start not in as_text and smollm2.decode(as_text) == "<|im_start|>user"
    assert smollm2.decode([im_start, user]) == "user"
    assert smollm2.decode([im_start, user], special=True) == "<|im_start|>user"


def test_smollm2_properties(smollm2):
    assert (smollm2.model, smollm2.pre) == ("gpt2", "smollm")
    assert smollm2.vocab_size == 49152
    assert not smollm2.add_bos and smollm2.encode("Hi") == [smollm2.token_to_id("Hi")]
    # <|im_end|> (eos), <|endoftext|> by name, and <reponame> as llama.cpp's fill-in-the-middle repo token
    assert smollm2.eog_ids == {smollm2.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", "<reponame>")}
    assert smollm2.is_special(smollm2.token_to_id("<|im_start|>"))


def test_smollm2_eog_matches_llama_cpp(smollm2, live_llama_cpp):
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(live_llama_cpp.model)
    assert smollm2.eog_ids == {i for i in range(smollm2.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}


# --- Gemma 3 270M: a 262144-token llama vocabulary without the space prefix -------------------------

@pytest.fixture(scope="module")
def gemma3(gemma3_270m_path):
    return Tokenizer.from_gguf(gemma3_270m_path)


@pytest.fixture(scope="module")
def live_gemma3_llama_cpp(gemma3_270m_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(gemma3_270m_path), vocab_only=True, verbose=False)


GEMMA3_TURNS = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"


def test_gemma3_matches_llama_cpp_recording(gemma3):
    for entry in _by_text(_load("gemma3_reference_ids.json")):
        text = entry["text"]
        assert gemma3.encode(text) == entry["ids"], text
        assert gemma3.encode(text, special=True) == entry["ids_special"], text
        assert gemma3.decode(entry["ids"]) == entry["decoded"], text
        assert gemma3.decode(entry["ids_special"], special=True) == entry["decoded_special"], text


def test_gemma3_matches_live_llama_cpp(gemma3, live_gemma3_llama_cpp):
    import llama_cpp

    for text in TEXTS + [GEMMA3_TURNS]:
        for special in (False, True):
            assert gemma3.encode(text, special=special) == live_gemma3_llama_cpp.tokenize(
                text.encode(), add_bos=True, special=special), (text, special)
    vocab = llama_cpp.llama_model_get_vocab(live_gemma3_llama_cpp.model)
    assert gemma3.eog_ids == {i for i in range(gemma3.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def test_gemma3_tokenizes_as_expected(gemma3):
    assert (gemma3.model, gemma3.vocab_size, gemma3.bos_id, gemma3.eos_id) == ("llama", 262144, 2, 1)
    assert gemma3.add_bos and gemma3.encode("Hello") == [2, gemma3.token_to_id("Hello")]   # no "▁" in front
    assert gemma3.encode(" Hello", add_bos=False) == [gemma3.token_to_id("▁Hello")]
    start, end = gemma3.token_to_id("<start_of_turn>"), gemma3.token_to_id("<end_of_turn>")
    ids = gemma3.encode(GEMMA3_TURNS, special=True)
    assert ids[:3] == [2, start, gemma3.token_to_id("user")] and ids.count(end) == 1 and ids.count(start) == 2
    assert start not in gemma3.encode(GEMMA3_TURNS)                      # as text, not parsed
    assert gemma3.decode(ids) == "user\nWhat is 2+2?\nmodel\n"
    assert gemma3.decode(ids, special=True) == "<bos>" + GEMMA3_TURNS
    assert gemma3.eog_ids == {1, end, gemma3.token_to_id("</s>")}       # <eos>, <end_of_turn>, and </s> by text
    assert gemma3.encode("    x", add_bos=False)[0] == gemma3.token_to_id("    ")   # runs of spaces are pieces


def test_from_gguf_accepts_open_file(smollm2_path, smollm2):
    with gguf.read(smollm2_path) as f:
        assert Tokenizer.from_gguf(f).encode("Hello world") == smollm2.encode("Hello world")


def test_every_pre_tokenizer_matches_llama_cpp_recording():
    reference = _load("pretokenizer_reference_ids.json")
    assert reference["texts"] == TEXTS, "texts changed: rerun tests/data/make_reference_ids.py"
    names = [name for group in reference["groups"] for name in group["names"]]
    assert sorted(names) == sorted(SUPPORTED_PRE_TOKENIZERS)
    for group in reference["groups"]:
        for pre in group["names"]:
            tok = Tokenizer.from_metadata(_probe_metadata(pre))
            for text, ids in zip(TEXTS, group["ids"]):
                assert tok.encode(text) == ids, (pre, text)


def test_docs_list_every_pre_tokenizer():
    docs = (Path(__file__).parent.parent / "docs" / "tokenizer.md").read_text(encoding="utf-8")
    table = docs[docs.index("| `tokenizer.ggml.pre` |"):docs.index("The regexes are llama.cpp's")]
    first_cells = [row.split("|")[1] for row in table.splitlines()[2:] if row.startswith("|")]
    assert sorted(name for cell in first_cells for name in re.findall(r"`([^`]+)`", cell)) == sorted(
        SUPPORTED_PRE_TOKENIZERS)


def test_missing_pre_tokenizer_means_default():
    meta = _probe_metadata("default")
    del meta["tokenizer.ggml.pre"]
    tok = Tokenizer.from_metadata(meta)
    assert tok.pre == "default"
    assert tok.encode("1234 abc") == Tokenizer.from_metadata(_probe_metadata("default")).encode("1234 abc")


def test_user_defined_tokens_are_always_parsed():
    meta = _probe_metadata("gpt-2")
    types = list(meta["tokenizer.ggml.token_type"])
    types[1] = 4   # <|im_start|> as a user-defined token
    meta["tokenizer.ggml.token_type"] = types
    tok = Tokenizer.from_metadata(meta)
    assert tok.encode("<|im_start|>x")[0] == 1 and tok.encode("<|im_start|>x", special=True)[0] == 1
    assert tok.decode([1]) == "<|im_start|>"


def test_end_of_generation_text_forces_control_type():
    meta = _probe_metadata("gpt-2")
    types = list(meta["tokenizer.ggml.token_type"])
    types[2] = 1   # <|im_end|> given as normal: llama.cpp still treats it as control
    meta["tokenizer.ggml.token_type"] = types
    tok = Tokenizer.from_metadata(meta)
    assert tok.is_eog(2) and tok.is_special(2)
    assert tok.decode([2]) == "" and tok.decode([2], special=True) == "<|im_end|>"


# --- llama.cpp's own test vocabularies ------------------------------------------------------------------
# The part of each of llama.cpp's models/ggml-vocab-*.gguf that its test texts reach, with llama.cpp's
# ids (tests/data/make_llama_cpp_vocabs.py says how they were cut and checked).

LLAMA_CPP_VOCABS = sorted(p.stem for p in (DATA / "llama_cpp_vocabs").glob("*.json"))


@functools.lru_cache(maxsize=None)
def _vocab_script():
    spec = importlib.util.spec_from_file_location("make_llama_cpp_vocabs", DATA / "make_llama_cpp_vocabs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _llama_cpp_vocab(name):
    return _load(f"llama_cpp_vocabs/{name}.json")


def _llama_cpp_vocab_metadata(name, **overrides):
    meta = _vocab_script().expand(_llama_cpp_vocab(name)["vocab"])
    meta.update(overrides)
    return meta


@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vocabulary_matches_llama_cpp_recording(name):
    record = _llama_cpp_vocab(name)
    tok = Tokenizer.from_metadata(_llama_cpp_vocab_metadata(name))
    for text, ids, ids_special in zip(record["texts"], record["ids"], record["ids_special"]):
        assert tok.encode(text, add_bos=False) == ids, text
        assert tok.encode(text, add_bos=False, special=True) == ids_special, text
    assert tok.encode("Hello") == record["hello_with_bos"]
    assert tok.eog_ids == set(record["eog"])


@pytest.mark.parametrize("name", LLAMA_CPP_VOCABS)
def test_llama_cpp_vocabulary_matches_live_llama_cpp(name, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from zephyr.gguf import GGUFValueType
    from zephyr.testing.gguf_writer import Typed, write_gguf

    meta = _llama_cpp_vocab_metadata(name)
    types = Typed(GGUFValueType.INT32, meta["tokenizer.ggml.token_type"])   # the item type llama.cpp requires
    write_gguf(tmp_path / "vocab.gguf", {**meta, "tokenizer.ggml.token_type": types}, [])
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    tok = Tokenizer.from_metadata(meta)
    for text in _llama_cpp_vocab(name)["texts"]:   # the part is only the whole vocabulary for these
        for special in (False, True):
            assert tok.encode(text, add_bos=False, special=special) == llm.tokenize(
                text.encode(), add_bos=False, special=special), (text, special)


def test_phi3_special_tokens_swallow_ascii_whitespace_after_them():
    tok = Tokenizer.from_metadata(_llama_cpp_vocab_metadata("phi-3"))
    end, user = tok.token_to_id("<|end|>"), tok.token_to_id("<|user|>")
    hi = tok.encode("Hi", add_bos=False)
    assert tok.encode("<|user|>\n \tHi<|end|>\n", add_bos=False, special=True) == [user, *hi, end]
    # ... not Unicode spaces, and not when the token is text
    assert tok.encode("<|end|>\u3000", add_bos=False, special=True)[1:] == tok.encode("\u3000", add_bos=False)
    assert tok.encode("<|end|>\n", add_bos=False) == tok.encode("<|end|>", add_bos=False) + tok.encode("\n", add_bos=False)[1:]
    # <s>, <unk> and <|endoftext|> keep the whitespace; so does every token of a vocabulary not named Phi-3
    assert tok.encode("<s>\n", add_bos=False, special=True) == [1, tok.token_to_id("▁"), tok.token_to_id("<0x0A>")]
    plain = Tokenizer.from_metadata(_llama_cpp_vocab_metadata("phi-3", **{"general.name": "other"}))
    assert plain.encode("<|end|>\n", add_bos=False, special=True)[1:] == plain.encode("\n", add_bos=False)
    assert tok.max_token_chars is None and plain.max_token_chars is not None


def test_qwen2_aliases_tokenize_alike():
    texts = _llama_cpp_vocab("qwen2")["texts"]
    qwen2 = Tokenizer.from_metadata(_llama_cpp_vocab_metadata("qwen2"))
    for alias in ("deepseek-r1-qwen", "grok-2"):
        tok = Tokenizer.from_metadata(_llama_cpp_vocab_metadata("qwen2", **{"tokenizer.ggml.pre": alias}))
        assert tok.pre == alias
        assert [tok.encode(t) for t in texts] == [qwen2.encode(t) for t in texts]


def test_fill_in_the_middle_texts_are_control_tokens():
    meta = _probe_metadata("gpt-2")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<|fim_prefix|>", "<|fim_pad|>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1, 1]
    tok = Tokenizer.from_metadata(meta)
    prefix, pad = tok.token_to_id("<|fim_prefix|>"), tok.token_to_id("<|fim_pad|>")
    assert tok.is_special(prefix) and not tok.is_eog(prefix)
    assert tok.is_special(pad) and tok.is_eog(pad)
    assert tok.encode("<|fim_prefix|>", special=True) == [prefix] and prefix not in tok.encode("<|fim_prefix|>")


@pytest.mark.parametrize("extra, end_is_eog, end_kind", [
    ((), True, 3),
    (("<|return|>", "<|call|>"), False, 4),   # gpt-oss: <|end|> closes a message, not the turn
    (("<|calls|>", "<|flush|>"), False, 4),   # Solar Open
    (("<|return|>",), True, 3),
])
def test_end_token_of_gpt_oss_style_vocabularies(extra, end_is_eog, end_kind):
    meta = _probe_metadata("gpt-2")
    added = ["<|end|>", *extra, "<|channel|>"]
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + added
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [3] * len(added)
    tok = Tokenizer.from_metadata(meta)
    end, channel = tok.token_to_id("<|end|>"), tok.token_to_id("<|channel|>")
    assert tok.is_eog(end) == end_is_eog
    assert (tok.decode([end]) == "<|end|>") == (end_kind == 4)   # a user-defined token always renders
    assert tok.decode([channel]) == "<|channel|>"


def test_closing_s_is_a_normal_token_next_to_tool_response():
    meta = _probe_metadata("gpt-2")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["</s>", "<|tool_response>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [3, 3]
    tok = Tokenizer.from_metadata(meta)
    closing = tok.token_to_id("</s>")
    assert not tok.is_eog(closing) and not tok.is_special(closing)
    assert tok.is_eog(tok.token_to_id("<|tool_response>"))


# --- streaming ----------------------------------------------------------------------------------------

def _streamed(tok, ids, special=False):
    decoder = tok.stream_decoder(special=special)
    pieces = [decoder.push(i) for i in ids]
    return pieces, pieces + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_adds_up_to_decode(mistral, smollm2, text):
    for tok in (mistral, smollm2):
        for special in (False, True):
            ids = tok.encode(text, special=special)
            pieces, everything = _streamed(tok, ids, special)
            assert "".join(everything) == tok.decode(ids, special=special)
            assert everything[-1] == ""                              # nothing was held back at the end
            assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # never half a character


def test_stream_decoder_holds_back_partial_characters(mistral):
    ids = mistral.encode("🦩!", add_bos=False)   # "▁" then four byte tokens then "!"
    pieces, everything = _streamed(mistral, ids)
    assert pieces == ["", "", "", "", "🦩", "!"]
    assert "".join(everything) == "🦩!"


def test_stream_decoder_drops_only_the_first_prefix_space(mistral):
    ids = mistral.encode("Hello world")
    pieces, _ = _streamed(mistral, ids)
    assert pieces == ["", "Hello", " world"]


def test_stream_decoder_flushes_an_unfinished_character(mistral):
    first_byte = mistral.token_to_id("<0xF0>")
    decoder = mistral.stream_decoder()
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == "\ufffd"


# --- bad vocabularies -----------------------------------------------------------------------------------

def _tiny_llama(**overrides):
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁", "a", "▁a"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0],
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    meta.update({f"tokenizer.ggml.{k}": v for k, v in overrides.items()})
    return meta


def test_tiny_llama_vocabulary_works():
    tok = Tokenizer.from_metadata(_tiny_llama())
    assert tok.encode("a a") == [1, 5, 5]
    assert tok.decode([1, 5, 5]) == "a a"


@pytest.mark.parametrize("overrides, message", [
    ({"model": None}, "no tokenizer.ggml.model"),
    ({"model": "wordpiece"}, "unsupported vocabulary kind.*'wordpiece'.*llama, gpt2"),
    ({"tokens": None}, "tokens is missing"),
    ({"tokens": []}, "tokens is missing, empty"),
    ({"tokens": ["a", 2]}, "not a list of strings"),
    ({"scores": None}, "needs tokenizer.ggml.scores"),
    ({"scores": [0.0] * 5}, "scores has 5 entries but tokenizer.ggml.tokens has 6"),
    ({"token_type": [1] * 7}, "token_type has 7 entries but tokenizer.ggml.tokens has 6"),
    ({"token_type": [2, 3, 3, 1, 1, 9]}, "unknown token types \\[9\\]"),
    ({"bos_token_id": 6}, "bos_token_id=6 is not a token id"),
    ({"tokens": ["<unk>", "<s>", "</s>", "▁", "<0xZZ>", "▁a"], "token_type": [2, 3, 3, 1, 6, 1]},
     "byte token '<0xZZ>'"),
])
def test_bad_llama_vocabulary(overrides, message):
    meta = {k: v for k, v in _tiny_llama(**overrides).items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(meta)


def _tiny_gpt2(**overrides):
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
    }
    meta.update({f"tokenizer.ggml.{k}": v for k, v in overrides.items()})
    return meta


def test_tiny_gpt2_vocabulary_works():
    tok = Tokenizer.from_metadata(_tiny_gpt2())
    assert tok.encode("abba") == [3, 2, 1]
    assert tok.eog_ids == {0}


@pytest.mark.parametrize("overrides, message", [
    ({"pre": "no-such-pre"}, "unsupported pre-tokenizer.*'no-such-pre'.*smollm"),
    ({"merges": None}, "needs tokenizer.ggml.merges"),
    ({"merges": ["a c"]}, "merges\\[0\\] = 'a c'"),
    ({"merges": ["ab"]}, "merges\\[0\\] = 'ab'"),
    ({"merges": ["b a"]}, "merges\\[0\\] = 'b a'"),   # "ba" is not a token
    ({"eos_token_id": -1}, "eos_token_id=-1 is not a token id"),
])
def test_bad_gpt2_vocabulary(overrides, message):
    meta = {k: v for k, v in _tiny_gpt2(**overrides).items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(meta)


def test_bad_ids(mistral):
    for call in (lambda: mistral.decode([32000]), lambda: mistral.decode([5, -1]), lambda: mistral.id_to_token(-1),
                 lambda: mistral.stream_decoder().push(10**6), lambda: mistral.stream_decoder().push(-2)):
        with pytest.raises(TokenizerError, match="out of range"):
            call()


def test_numpy_ids(mistral):
    np = pytest.importorskip("numpy")
    ids = np.array(mistral.encode("Hello world"), dtype=np.int64)
    assert mistral.decode(ids) == "Hello world"
    decoder = mistral.stream_decoder()
    assert "".join(decoder.push(i) for i in ids) == "Hello world"
    assert mistral.id_to_token(ids[1]) == "▁Hello" and mistral.is_eog(np.int32(2))


def test_encode_rejects_bytes(mistral):
    with pytest.raises(TypeError):
        mistral.encode(b"hello")


def test_read_spm_model_matches_sentencepiece(mistral_vocab_path, sp):
    tokens, scores, types = read_spm_model(mistral_vocab_path)
    assert len(tokens) == sp.get_piece_size() == 32000
    assert tokens == [sp.id_to_piece(i) for i in range(32000)]
    assert scores == [sp.get_score(i) for i in range(32000)]
    assert types[:3] == [2, 3, 3] and types[3:259] == [6] * 256 and set(types[259:]) == {1}


def test_read_spm_model_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        read_spm_model(bad)


def test_text_with_a_lone_surrogate_is_a_tokenizer_error(mistral, smollm2):
    for tokenizer in (mistral, smollm2):
        with pytest.raises(TokenizerError, match=r"not valid Unicode: surrogates not allowed at character 2"):
            tokenizer.encode("ab\ud800c")


def test_encode_continuation_puts_no_space_or_bos_in_front(mistral, smollm2):
    for tokenizer in (mistral, smollm2):
        for text in ("a", "{\"key\": 1}", " leading space", "\ntwo\nlines"):
            ids = tokenizer.encode_continuation(text)
            assert b"".join(tokenizer.token_bytes()[i] for i in ids) == text.encode()
            assert tokenizer.bos_id not in ids
