"""Record llama.cpp's tokenization of its own test vocabularies for tests/test_tokenizer.py.

llama.cpp ships real model vocabularies with test texts (`models/ggml-vocab-NAME.gguf` and
`.gguf.inp`). The vocabularies are megabytes each, so what is stored here, one file per vocabulary
in tests/data/llama_cpp_vocabs/, is the part of each that the texts can reach, with its ids kept:

- every token that is not a normal token (control, user-defined, unknown, byte, unused), since
  these are matched in text or stand for bytes;
- every normal token that occurs in one of the texts as the tokenizer sees them (byte-level for gpt2
  vocabularies, with "▁" for spaces and in front for llama ones), and its score;
- every merge whose result is such a token, in the original order.

Tokenizing a text only ever forms tokens that are substrings of it (of its pieces between special
tokens, each with "▁" in front, for llama vocabularies), and only applies merges whose result is one, so the part tokenizes these texts exactly as the whole does. This script checks that
claim on llama.cpp itself: it writes the part back into a GGUF (the other ids as unused
placeholders) and requires llama.cpp to produce the same ids from it as from the original file.

The oracle is llama.cpp through llama-cpp-python, and the vocabularies come from the same package's
source distribution (it vendors llama.cpp). Run from the repository root:

    pip install llama-cpp-python==0.3.36 gguf==0.19.0
    pip download --no-deps --no-binary :all: -d /tmp llama-cpp-python==0.3.36
    python tests/data/make_llama_cpp_vocabs.py /tmp/llama_cpp_python-0.3.36.tar.gz

Each file holds the texts (llama.cpp's .inp texts plus a line of the vocabulary's own chat markup),
llama.cpp's ids for them with special tokens parsed and not (no BOS), its ids of "Hello" with BOS
as the file asks, and its end-of-generation ids.
"""
import hashlib
import json
import re
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "llama_cpp_vocabs"
# The vocabularies of llama.cpp's models/ directory that zephyr reads (bert, t5 and gemma4 kinds it does not).
NAMES = ("command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe", "llama-spm", "mpt",
         "phi-3", "qwen2", "qwen35", "refact", "starcoder")
NORMAL, UNUSED = 1, 5
# Chat markup of the families above, used where the vocabulary has the token.
MARKUP = ("<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
          "<|end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
          "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<｜begin▁of▁sentence｜>",
          "<|fim_prefix|>", "<|fim_suffix|>")


def byte_alphabet():
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0x100
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(extra))
            extra += 1
    return chars


def read_vocab(data: bytes):
    """(tokenizer.ggml.* and general.name/architecture values, as Python values) of a GGUF file's bytes."""
    import gguf

    with tempfile.NamedTemporaryFile(suffix=".gguf") as tmp:
        tmp.write(data)
        tmp.flush()
        reader = gguf.GGUFReader(tmp.name)
        return {key: field.contents() for key, field in reader.fields.items()
                if key.startswith("tokenizer.ggml.") or key in ("general.name", "general.architecture")}


# What follows each piece of markup: tokens with llama.cpp's rstrip attribute swallow ASCII whitespace only.
SPACES = ("\n  ", " \t", "\u3000", "\u00a0 ")


def markup_line(tokens):
    present = [t for t in MARKUP if t in set(tokens)]
    return "".join(f"{t}{SPACES[i % len(SPACES)]}word{i} " for i, t in enumerate(present)) + "end"


def reachable_part(meta, texts):
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if meta["tokenizer.ggml.model"] == "gpt2":
        alphabet = byte_alphabet()
        seen = ["".join(alphabet[b] for b in text.encode()) for text in texts]
    else:
        # a llama vocabulary puts "▁" in front of the text and of every piece between special tokens,
        # which may first lose the whitespace after the token before
        specials = sorted((t for t, kind in zip(tokens, types) if kind != NORMAL), key=len, reverse=True)
        pieces = [piece for text in texts for piece in [text, *re.split("|".join(map(re.escape, specials)), text)]]
        pieces += [piece.lstrip(" \t\n\v\f\r") for piece in pieces]
        seen = [("▁" + piece).replace(" ", "▁") for piece in pieces]
    corpus = "\0".join(seen)
    kept = [i for i, (token, kind) in enumerate(zip(tokens, types)) if kind != NORMAL or token in corpus]
    kept_texts = {tokens[i] for i in kept}
    merges = [m for m in meta.get("tokenizer.ggml.merges") or []
              if m[:m.find(" ", 1)] + m[m.find(" ", 1) + 1:] in kept_texts]
    scores = meta.get("tokenizer.ggml.scores")
    return {
        "size": len(tokens),
        "tokens": [[i, tokens[i], types[i]] + ([scores[i]] if scores is not None else []) for i in kept],
        "merges": merges,
        "metadata": {key: value for key, value in meta.items() if not isinstance(value, list)},
    }


def expand(part):
    """GGUF metadata for a stored part: the tokens not kept become unused placeholders."""
    size = part["size"]
    tokens = [f"<unreachable-{i}>" for i in range(size)]
    types = [UNUSED] * size
    scores = [0.0] * size
    for entry in part["tokens"]:
        i, text, kind = entry[:3]
        tokens[i], types[i] = text, kind
        if len(entry) > 3:
            scores[i] = entry[3]
    meta = dict(part["metadata"])
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    if meta["tokenizer.ggml.model"] == "gpt2":
        meta["tokenizer.ggml.merges"] = part["merges"]
    else:
        meta["tokenizer.ggml.scores"] = scores
    return meta


def write_vocab_gguf(path, meta):
    import gguf

    writer = gguf.GGUFWriter(str(path), meta.get("general.architecture", "llama"))
    for key, value in meta.items():
        if key == "general.architecture":
            continue
        if key == "tokenizer.ggml.token_type":
            writer.add_array(key, value)   # int32 items, as converters write them
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def llama_cpp_answers(path, texts):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    answers = {
        "ids": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts],
        "ids_special": [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts],
        "hello_with_bos": llm.tokenize(b"Hello", add_bos=True, special=False),
        "eog": [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)],
    }
    del llm
    return answers


def _dumps(record) -> str:
    """JSON with every innermost list on one line (JSON strings hold no raw newline to be hurt)."""
    text = json.dumps(record, ensure_ascii=False, indent=1)
    return re.sub(r"\[[^\[\]]*\]", lambda m: re.sub(r"\[\n\s*", "[", re.sub(r"\n\s*(\]?)", r" \1", m.group(0)))
                  .replace(" ]", "]"), text)


def main(sdist):
    import llama_cpp

    archive_sha256 = hashlib.sha256(Path(sdist).read_bytes()).hexdigest()
    OUT.mkdir(exist_ok=True)
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory() as tmp:
        members = {Path(m.name).name: m for m in archive.getmembers()
                   if re.search(r"/vendor/llama\.cpp/models/ggml-vocab-[^/]+$", m.name)}
        for name in NAMES:
            data = archive.extractfile(members[f"ggml-vocab-{name}.gguf"]).read()
            texts = archive.extractfile(members[f"ggml-vocab-{name}.gguf.inp"]).read().decode()
            texts = texts.split("\n__ggml_vocab_test__\n")
            meta = read_vocab(data)
            texts.append(markup_line(meta["tokenizer.ggml.tokens"]))
            whole = Path(tmp) / f"{name}.gguf"
            whole.write_bytes(data)
            expected = llama_cpp_answers(whole, texts)
            part = reachable_part(meta, texts)
            pruned = Path(tmp) / f"{name}-part.gguf"
            write_vocab_gguf(pruned, expand(part))
            if llama_cpp_answers(pruned, texts) != expected:
                raise SystemExit(f"{name}: llama.cpp tokenizes the reachable part differently from the whole")
            record = {
                "produced_by": "llama.cpp via llama-cpp-python: Llama(path, vocab_only=True).tokenize(text, "
                               "add_bos, special); vocabulary and texts: vendor/llama.cpp/models of its sdist; "
                               "see tests/data/make_llama_cpp_vocabs.py",
                "versions": {"llama-cpp-python": llama_cpp.__version__},
                "sdist_sha256": archive_sha256,
                "vocab_sha256": hashlib.sha256(data).hexdigest(),
                "texts": texts, **expected, "vocab": part,
            }
            (OUT / f"{name}.json").write_text(_dumps(record) + "\n", encoding="utf-8")
            print(f"wrote {OUT / name}.json: {len(part['tokens'])} of {part['size']} tokens")


if __name__ == "__main__":
    main(sys.argv[1])
