"""Record llama.cpp's tokenization of tests/data/tokenizer_texts.json for tests/test_tokenizer.py.

The oracle is llama.cpp through llama-cpp-python (`Llama(path, vocab_only=True)`, then `.tokenize`
and `.detokenize`), which CI does not install, so its answers are stored here. Run from the
repository root after changing the texts or upgrading the oracle:

    pip install llama-cpp-python==0.3.36 gguf==0.19.0 sentencepiece
    python tests/data/make_reference_ids.py

It writes, each file naming the library versions that produced it:

- smollm2_reference_ids.json: the real SmolLM2-135M-Instruct GGUF (gpt2 vocabulary, pre "smollm"),
  tokenized with special=False and special=True (no BOS), and the detokenized ids both ways.
- gemma3_reference_ids.json: the real Gemma 3 270M GGUF (a 262144-token llama vocabulary without
  the space prefix), the same way but with BOS, as the file asks, and detokenized by llama.cpp's
  llama_detokenize itself (see `_llama_cpp_detokenizer`).
- pretokenizer_reference_ids.json: one "probe" byte-level vocabulary (see `probe_vocab`) written
  into a vocabulary-only GGUF once per `tokenizer.ggml.pre` name zephyr supports; names whose ids
  llama.cpp made identical on every text share one entry ("groups": [{"names", "ids"}]). The probe's merges join any
  characters, so its tokens cross every boundary the pre-tokenizer leaves, and the ids show where
  each kind splits the text.
- mistral_reference_ids.json: Mistral's tokenizer.model.v1 (Zephyr-7B-beta's llama vocabulary)
  read with sentencepiece and written into a vocabulary-only GGUF; tokenized with BOS, special
  False and True, and detokenized.

The GGUF files are written with the `gguf` package, and the Mistral vocabulary is read with
`sentencepiece`, so no zephyr code sits between the vocabularies and the oracle.
"""
import json
import re
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent
PROBE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROBE_MAX_TOKEN_CHARS = 6


def load_texts():
    return json.loads((DATA / "tokenizer_texts.json").read_text(encoding="utf-8"))["texts"]


def byte_alphabet():
    """GPT-2's byte-level alphabet: byte b ↔ character alphabet[b]."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0x100
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(extra))
            extra += 1
    return chars


def probe_vocab(texts):
    """(tokens, token_types, merges): 3 control tokens, the 256 byte characters, then every substring
    of 2..6 characters of the byte-level texts, each made by merging its last character onto the rest
    (shorter tokens first)."""
    alphabet = byte_alphabet()
    corpus = ["".join(alphabet[b] for b in text.encode("utf-8")) for text in texts]
    pieces = {line[i:i + n] for line in corpus for n in range(2, PROBE_MAX_TOKEN_CHARS + 1)
              for i in range(len(line) - n + 1)}
    pieces = sorted(pieces - set(alphabet), key=lambda p: (len(p), p))
    tokens = PROBE_SPECIAL + alphabet + pieces
    types = [3] * len(PROBE_SPECIAL) + [1] * (len(alphabet) + len(pieces))
    merges = [f"{p[:-1]} {p[-1]}" for p in pieces]
    return tokens, types, merges


def _write_vocab_gguf(path, tokens, types, *, model, pre=None, merges=None, scores=None, bos=None, eos=None,
                      unk=None, add_bos=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for value, add in ((bos, writer.add_bos_token_id), (eos, writer.add_eos_token_id), (unk, writer.add_unk_token_id)):
        if value is not None:
            add(value)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _oracle(path):
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _entries(llm, texts, add_bos, detokenize=None):
    detokenize = detokenize or llm.detokenize
    out = []
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        ids_special = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        out.append({
            "text": text,
            "ids": ids,
            "ids_special": ids_special,
            "decoded": detokenize(ids, special=False).decode("utf-8", errors="replace"),
            "decoded_special": detokenize(ids_special, special=True).decode("utf-8", errors="replace"),
        })
    return out


def _llama_cpp_detokenizer(llm):
    """llama.cpp's own llama_detokenize. (Llama.detokenize also drops a space that follows BOS, for
    Llama 1; for a vocabulary without the space prefix, such as Gemma's, llama.cpp keeps it.)"""
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def detokenize(ids, special):
        buffer = ctypes.create_string_buffer(1 << 16)
        n = llama_cpp.llama_detokenize(vocab, (llama_cpp.llama_token * len(ids))(*ids), len(ids), buffer,
                                       len(buffer), False, special)
        return buffer.raw[:n]
    return detokenize


def _versions():
    from importlib.metadata import version

    import llama_cpp

    return {"llama-cpp-python": llama_cpp.__version__, "gguf": version("gguf"),
            "sentencepiece": version("sentencepiece")}


def _dump(name, payload):
    text = json.dumps(payload, ensure_ascii=False, indent=1)
    # one line per id list
    text = re.sub(r"\[[\d,\s]*\]", lambda m: "[" + ", ".join(re.findall(r"\d+", m.group(0))) + "]", text)
    (DATA / name).write_text(text + "\n", encoding="utf-8")
    print(f"wrote {DATA / name}")


def main():
    sys.path.insert(0, str(DATA.parent))
    from conftest import MISTRAL_VOCAB
    from zephyr.demo import demo_model_path, fetch_wheel_file, named_model_path, sha256_of
    from zephyr.tokenizer import SUPPORTED_PRE_TOKENIZERS

    texts = load_texts()
    versions = _versions()
    how = "llama.cpp via llama-cpp-python: Llama(path, vocab_only=True).tokenize(text, add_bos, special) / .detokenize"

    smollm2 = demo_model_path()
    _dump("smollm2_reference_ids.json", {
        "produced_by": how, "versions": versions, "model_sha256": sha256_of(smollm2), "add_bos": False,
        "entries": _entries(_oracle(smollm2), texts, add_bos=False)})

    gemma3 = named_model_path("gemma3-270m")
    gemma3_llm = _oracle(gemma3)
    _dump("gemma3_reference_ids.json", {
        "produced_by": how, "versions": versions, "model_sha256": sha256_of(gemma3), "add_bos": True,
        "entries": _entries(gemma3_llm, texts, add_bos=True, detokenize=_llama_cpp_detokenizer(gemma3_llm))})

    tokens, types, merges = probe_vocab(texts)
    groups = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in SUPPORTED_PRE_TOKENIZERS:
            path = Path(tmp) / f"probe-{pre}.gguf"
            _write_vocab_gguf(path, tokens, types, model="gpt2", pre=pre, merges=merges, bos=0, eos=2,
                              add_bos=False)
            llm = _oracle(path)
            ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
            groups.setdefault(json.dumps(ids), {"names": [], "ids": ids})["names"].append(pre)
            del llm

        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(fetch_wheel_file(MISTRAL_VOCAB)))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        sp_types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                    else 5 if sp.is_unused(i) else 1 for i in range(sp.get_piece_size())]
        path = Path(tmp) / "mistral-vocab.gguf"
        _write_vocab_gguf(path, pieces, sp_types, model="llama", scores=scores, bos=sp.bos_id(), eos=sp.eos_id(),
                          unk=sp.unk_id(), add_bos=True)
        mistral = _entries(_oracle(path), texts, add_bos=True)

    _dump("pretokenizer_reference_ids.json", {
        "produced_by": how + "; vocabulary: probe_vocab() in make_reference_ids.py", "versions": versions,
        "texts": texts, "groups": list(groups.values())})
    _dump("mistral_reference_ids.json", {
        "produced_by": how + "; vocabulary: mistral-common 1.13.1 tokenizer.model.v1 read with sentencepiece",
        "versions": versions, "add_bos": True, "entries": mistral})


if __name__ == "__main__":
    main()
