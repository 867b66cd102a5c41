"""Text ↔ token ids for a GGUF model, built from the vocabulary in the file's metadata.

Two vocabulary kinds (`tokenizer.ggml.model`):

- "llama": SentencePiece BPE (Llama, Mistral, Zephyr). Spaces are written "▁" and one "▁" is put in
  front of the text; pieces merge by score (the pair whose concatenation scores highest merges
  first); characters with no piece fall back to the `<0xNN>` byte tokens.
- "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM). A regex pre-tokenizer, chosen by
  `tokenizer.ggml.pre`, splits the text into words; each byte becomes one printable character;
  words merge by the ranked merge list.

Encoding runs on Hugging Face `tokenizers`, built in memory from the metadata. Decoding does not
need it: every id maps to the bytes it stands for, so decoding is a table look-up and a UTF-8
decode, and streaming is the same with an incremental UTF-8 decoder.

Rendering follows llama.cpp: control tokens (BOS, EOS, <|im_end|>, ...) are parsed in text and
rendered in output only with `special=True` (so are unknown tokens); user-defined tokens always are.
"""
import codecs
import operator
import threading

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from .errors import TokenizerError

# GGUF token types (tokenizer.ggml.token_type), the same numbering as SentencePiece's.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 0, 1, 2, 3, 4, 5, 6

SPACE_MARK = "\u2581"    # "▁", SentencePiece's visible space

# Longest llama-vocabulary piece that merges can build. Finding a piece's merges is quadratic in its
# length, and a hostile file may hold megabyte-long pieces; real vocabularies stay under 32.
MAX_MERGED_PIECE_CHARS = 256

# End of generation, as llama.cpp decides it: the eos/eot/eom ids, tokens with one of these texts, and
# the fill-in-the-middle pad / repository / file-separator tokens (by metadata id or by text). All of
# them are treated as control tokens, whatever type the file gives them.
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|return|>", "<|call|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
})
FIM_EOG_TOKEN_TEXTS = {
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

# Pre-tokenizer regexes (split patterns; the text between matches is kept as words too).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tekken as llama.cpp runs it: letters split at a lower→upper case change; combining marks are not letters.
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's "default": four passes, each splitting the words of the one before.
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)


class _PreTokenizer:
    def __init__(self, patterns, ignore_merges=False, add_bos=False):
        self.patterns = patterns              # applied in order, each refining the previous split
        self.ignore_merges = ignore_merges    # a word that is itself a token is taken whole
        self.add_bos = add_bos                # llama.cpp's default when add_bos_token is absent


_PRE_TOKENIZERS = {
    "default": _PreTokenizer(_DEFAULT),
    "gpt-2": _PreTokenizer((_GPT2,)),
    "llama3": _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "llama-v3": _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "llama-bpe": _PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True),
    "smollm": _PreTokenizer(_DIGITS_THEN_GPT2),
    "starcoder": _PreTokenizer(_DIGITS_THEN_GPT2),
    "refact": _PreTokenizer(_DIGITS_THEN_GPT2),
    "codeshell": _PreTokenizer(_DIGITS_THEN_GPT2),
    "qwen2": _PreTokenizer((_QWEN2,)),
    "tekken": _PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
}
SUPPORTED_PRE_TOKENIZERS = tuple(_PRE_TOKENIZERS)
SUPPORTED_MODELS = ("llama", "gpt2")


class Tokenizer:
    """A model's tokenizer: `encode` text to ids, `decode` ids to text, `stream_decoder` for streaming."""

    def __init__(self, vocab, encoder):
        self._vocab = vocab
        self._encoder = encoder                  # the Hugging Face tokenizer (encoding only)
        self._encode_lock = threading.Lock()     # guards the encoder's special-token switch
        self._text_bytes, self._special_bytes = map(tuple, vocab.token_bytes())
        self.eog_ids = vocab.eog_ids             # frozenset of the ids that end generation
        # No token stands for more characters of text than its own text has, so a text of n characters
        # is at least n / max_token_chars tokens. None: no such bound, because a llama vocabulary
        # without byte tokens fuses a run of unknown characters, however long, into one <unk>.
        fuses_unknown = vocab.model == "llama" and BYTE not in vocab.types
        self.max_token_chars = None if fuses_unknown else max(map(len, vocab.tokens))

    @classmethod
    def from_gguf(cls, source):
        """Build from a GGUF path or an open `zephyr.gguf.GGUFFile`."""
        if hasattr(source, "metadata"):
            return cls.from_metadata(source.metadata)
        from . import gguf
        with gguf.read(source) as f:
            return cls.from_metadata(f.metadata)

    @classmethod
    def from_metadata(cls, metadata):
        """Build from GGUF metadata (key → value), reading only the `tokenizer.ggml.*` keys."""
        vocab = _Vocab.from_metadata(metadata)
        build = _build_llama if vocab.model == "llama" else _build_gpt2
        return cls(vocab, build(vocab))

    @property
    def model(self) -> str:
        """The vocabulary kind: "llama" or "gpt2"."""
        return self._vocab.model

    @property
    def pre(self):
        """The gpt2 pre-tokenizer name (None for llama vocabularies)."""
        return self._vocab.pre

    @property
    def vocab_size(self) -> int:
        return len(self._vocab.tokens)

    @property
    def bos_id(self):
        return self._vocab.bos_id

    @property
    def eos_id(self):
        return self._vocab.eos_id

    @property
    def add_bos(self) -> bool:
        """Whether `encode` puts BOS first by default."""
        return self._vocab.add_bos

    def token_to_id(self, token: str):
        """The id of a token's text (as stored in the vocabulary), or None."""
        return self._vocab.ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._vocab.tokens[self._check_id(token_id)]

    def is_eog(self, token_id: int) -> bool:
        """Whether generating this token ends the turn."""
        return token_id in self.eog_ids

    def is_special(self, token_id: int) -> bool:
        """Whether this is a control, unknown or user-defined token (matched whole, never built by merges)."""
        return self._vocab.types[self._check_id(token_id)] in (CONTROL, UNKNOWN, USER_DEFINED)

    def encode(self, text: str, add_bos=None, special=False) -> list:
        """Token ids of `text`. add_bos None → the file's choice; special → parse control tokens in text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        with self._encode_lock:
            self._encoder.encode_special_tokens = not special
            try:
                ids = self._encoder.encode(text, add_special_tokens=False).ids
            except TypeError:   # what the Rust side says of a str that is not valid Unicode
                _check_encodable(text)
                raise
        vocab = self._vocab
        if (vocab.add_bos if add_bos is None else add_bos) and vocab.bos_id is not None:
            ids.insert(0, vocab.bos_id)
        if vocab.add_eos and vocab.eos_id is not None:
            ids.append(vocab.eos_id)
        return ids

    def encode_continuation(self, text: str) -> list:
        """Token ids of `text` as it would be tokenized after other text: no BOS or EOS, and no space
        put in front (a llama vocabulary's "▁" prefix). For tokenizing pieces of a generation."""
        sentinel = self._continuation_sentinel()
        ids = self.encode(sentinel + text, add_bos=False)
        if self._vocab.add_eos and ids and ids[-1] == self._vocab.eos_id:
            ids.pop()
        if sentinel:
            prefix = self.encode(sentinel, add_bos=False)[:-1 if self._vocab.add_eos else None]
            if ids[:len(prefix)] != prefix:
                raise TokenizerError(f"cannot tokenize {text[:40]!r} as a continuation")
            ids = ids[len(prefix):]
        return ids

    def _continuation_sentinel(self) -> str:
        """A control character tokenized alone and merging with nothing, put before a continuation so
        that the "▁" a llama vocabulary puts in front of the text attaches to it ("" when none is put)."""
        if not (self._vocab.model == "llama" and self._vocab.add_space_prefix):
            return ""
        for code in range(1, 32):
            byte = bytes([code])
            if any(t[:1] == byte and t != byte or t[:2] == b" " + byte for t in self._text_bytes):
                continue
            if self.decode(self.encode(chr(code), add_bos=False)) == chr(code):
                return chr(code)
        raise TokenizerError("this vocabulary has no control character that stands alone, so pieces of text "
                             "cannot be tokenized without the space it puts in front")

    def decode(self, ids, special=False) -> str:
        """The text of `ids`; control tokens render as "" unless special. Invalid UTF-8 becomes U+FFFD."""
        table = self._special_bytes if special else self._text_bytes
        ids = list(ids)
        try:
            pieces = [table[i] for i in ids]
            if ids and min(ids) < 0:
                raise IndexError
        except (IndexError, TypeError):
            for i in ids:
                self._check_id(i)
            raise
        data = b"".join(pieces)
        if self._vocab.strip_first_space:
            data = _without_prefix_space(data)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, special=False) -> tuple:
        """id -> the bytes that token stands for, for every id; control tokens are b"" unless special."""
        return self._special_bytes if special else self._text_bytes

    def stream_decoder(self, special=False):
        """A `StreamDecoder` whose pushes add up to `decode` of all the ids pushed."""
        return StreamDecoder(self, special)

    def _check_id(self, token_id):
        """token_id as an int (numpy integers welcome), if it is an id of this vocabulary."""
        try:
            index = operator.index(token_id)
        except TypeError:
            raise TypeError(f"a token id is an integer, not {type(token_id).__name__}") from None
        if not 0 <= index < len(self._vocab.tokens):
            raise TokenizerError(f"token id {index} is out of range for a vocabulary of "
                                 f"{len(self._vocab.tokens)} tokens")
        return index

    def __repr__(self):
        pre = f", pre={self.pre!r}" if self.pre else ""
        return f"Tokenizer(model={self.model!r}{pre}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns generated ids into text as they arrive, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer, special=False):
        self._tokenizer = tokenizer
        self._table = tokenizer._special_bytes if special else tokenizer._text_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer._vocab.strip_first_space   # until the first bytes are out

    def push(self, token_id: int) -> str:
        """The text this token completes (may be "" while a character's bytes are still arriving)."""
        try:
            data = self._table[token_id]
            if token_id < 0:
                raise IndexError
        except (IndexError, TypeError):
            self._tokenizer._check_id(token_id)
            raise
        if self._strip_space and data:
            data = _without_prefix_space(data)
            self._strip_space = False
        return self._utf8.decode(data)

    def flush(self) -> str:
        """The rest: bytes of a character that never completed come out as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _check_encodable(text: str):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"the text is not valid Unicode: {exc.reason} at character {exc.start} "
                             f"({text[exc.start]!r})") from None


def _without_prefix_space(data: bytes) -> bytes:
    return data[1:] if data[:1] == b" " else data


class _Vocab:
    """The `tokenizer.ggml.*` metadata, checked."""

    def __init__(self, model, pre, tokens, types, scores, merges, special_ids, add_bos, add_eos, add_space_prefix):
        self.model = model
        self.pre = pre
        self.tokens = tokens
        self.scores = scores
        self.merges = merges
        self.ids = {text: i for i, text in enumerate(tokens)}   # a repeated text maps to its last id
        self.special_ids = special_ids
        self.eog_ids, eog_by_text = self._end_of_generation_ids()
        if any(types[i] != CONTROL for i in eog_by_text):
            types = [CONTROL if i in eog_by_text else kind for i, kind in enumerate(types)]
        self.types = types
        self.bos_id = special_ids["bos"]
        self.eos_id = special_ids["eos"]
        self.unknown_id = special_ids["unknown"]
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        # The "▁" put in front of the text comes back as a space at the start of the output.
        self.strip_first_space = model == "llama" and add_space_prefix

    @classmethod
    def from_metadata(cls, metadata):
        def get(key, default=None):
            return metadata.get("tokenizer.ggml." + key, default)

        model = get("model")
        if model is None:
            raise TokenizerError("the file has no tokenizer.ggml.model, so it carries no vocabulary")
        if model not in SUPPORTED_MODELS:
            raise TokenizerError(f"unsupported vocabulary kind tokenizer.ggml.model={model!r}; "
                                 f"supported: {', '.join(SUPPORTED_MODELS)}")
        tokens = get("tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("tokenizer.ggml.tokens is missing, empty or not a list of strings")
        n = len(tokens)
        types = _list_of(get("token_type"), "token_type", n, int, default=NORMAL)
        unknown_types = sorted(set(types) - {UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})
        if unknown_types:
            raise TokenizerError(f"tokenizer.ggml.token_type holds unknown token types {unknown_types[:5]}")

        pre, scores, merges = None, None, None
        if model == "llama":
            if get("scores") is None:
                raise TokenizerError("a llama vocabulary needs tokenizer.ggml.scores to rank its merges")
            scores = _list_of(get("scores"), "scores", n, (int, float))
        else:
            pre = get("pre") or "default"
            if pre not in _PRE_TOKENIZERS:
                raise TokenizerError(f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                                     f"supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}")
            merges = get("merges")
            if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
                raise TokenizerError("a gpt2 vocabulary needs tokenizer.ggml.merges, a list of \"a b\" strings")

        special_ids = {}
        for name in ("bos", "eos", "unknown", "padding", "eot", "eom", *FIM_EOG_TOKEN_TEXTS):
            key = f"{name}_token_id"
            token_id = get(key)
            if token_id is not None and (not isinstance(token_id, int) or not 0 <= token_id < n):
                raise TokenizerError(f"tokenizer.ggml.{key}={token_id!r} is not a token id "
                                     f"(the vocabulary has {n} tokens)")
            special_ids[name] = token_id

        default_add_bos = True if model == "llama" else _PRE_TOKENIZERS[pre].add_bos
        return cls(model, pre, tokens, types, scores, merges, special_ids,
                   add_bos=bool(get("add_bos_token", default_add_bos)),
                   add_eos=bool(get("add_eos_token", False)),
                   add_space_prefix=bool(get("add_space_prefix", model == "llama")))

    def token_bytes(self):
        """Two tables, id → the bytes it renders as: as text, and with `special` (control tokens' text)."""
        tokens, types = self.tokens, self.types
        if self.model == "llama":
            text = [t.replace(SPACE_MARK, " ").encode() for t in tokens]
        else:
            text = _byte_level_decode(tokens)
        special = list(text)
        for i, kind in enumerate(types):
            if kind == NORMAL:
                continue
            if kind == USER_DEFINED:
                text[i] = special[i] = tokens[i].encode()
            elif kind in (CONTROL, UNKNOWN):
                text[i], special[i] = b"", tokens[i].encode()
            elif kind == BYTE and self.model == "llama":
                text[i] = special[i] = _byte_token_value(tokens[i])
            else:
                text[i] = special[i] = b""
        return text, special

    def _end_of_generation_ids(self):
        """The end-of-generation ids, and among them those recognised by their text."""
        by_text = {self.ids[text] for text in EOG_TOKEN_TEXTS if text in self.ids}
        for name, texts in FIM_EOG_TOKEN_TEXTS.items():
            found = [self.ids[text] for text in texts if text in self.ids]
            if self.special_ids[name] is None and found:
                by_text.add(found[0])
        if {"<|return|>", "<|call|>"} <= {self.tokens[i] for i in by_text}:
            # gpt-oss ends a message with <|end|> but the turn with <|return|> or <|call|>
            by_text.discard(self.ids.get("<|end|>"))
        ids = by_text | {self.special_ids[name] for name in ("eos", "eot", "eom", *FIM_EOG_TOKEN_TEXTS)}
        ids.discard(None)
        return frozenset(ids), by_text


def _list_of(value, key, n, item_types, default=None):
    if value is None and default is not None:
        return [default] * n
    if not isinstance(value, list):
        raise TokenizerError(f"tokenizer.ggml.{key} is missing or not a list")
    if len(value) != n:
        raise TokenizerError(f"tokenizer.ggml.{key} has {len(value)} entries but tokenizer.ggml.tokens has {n}")
    if not all(isinstance(v, item_types) for v in value):
        raise TokenizerError(f"tokenizer.ggml.{key} holds values that are not {item_types}")
    return value


def _byte_token_value(token):
    """b"\\x41" for "<0x41>"."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    raise TokenizerError(f"byte token {token!r} is not of the form <0xNN>")


def _finish(model, vocab, normalizer=None, pre_tokenizer=None):
    encoder = HFTokenizer(model)
    if normalizer is not None:
        encoder.normalizer = normalizer
    if pre_tokenizer is not None:
        encoder.pre_tokenizer = pre_tokenizer
    # Control and unknown tokens are parsed in text only on request, user-defined ones always (as in llama.cpp).
    on_request = [AddedToken(token, special=True, normalized=False)
                  for token, kind in zip(vocab.tokens, vocab.types) if kind in (CONTROL, UNKNOWN)]
    always = [AddedToken(token, special=False, normalized=False)
              for token, kind in zip(vocab.tokens, vocab.types) if kind == USER_DEFINED]
    if on_request:
        encoder.add_special_tokens(on_request)
    if always:
        encoder.add_tokens(always)
    return encoder


def _build_llama(vocab):
    tokens, types, scores = vocab.tokens, vocab.types, vocab.scores
    for i, kind in enumerate(types):
        if kind == BYTE:
            _byte_token_value(tokens[i])
    unk = tokens[vocab.unknown_id] if vocab.unknown_id is not None else None
    model = models.BPE(vocab=vocab.ids, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                       fuse_unk=True, byte_fallback=BYTE in types)
    steps = [normalizers.Replace(" ", SPACE_MARK)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPACE_MARK))
    return _finish(model, vocab, normalizer=normalizers.Sequence(steps))


def _spm_merges(tokens, scores, types):
    """The merge list equivalent to SentencePiece's score-driven BPE.

    SentencePiece repeatedly joins the adjacent pair whose concatenation is the highest-scoring
    normal piece. As a ranked merge list: (a, b) for every normal piece a+b whose halves a and b
    are normal pieces too, best score first (ties: lower id first). Pieces longer than
    MAX_MERGED_PIECE_CHARS are left out (SentencePiece's own default limit is 16).
    """
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    ranked = []
    for piece, i in normal.items():
        if len(piece) > MAX_MERGED_PIECE_CHARS:
            continue   # every cut costs a copy: a megabyte-long piece would take minutes
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_gpt2(vocab):
    known = vocab.ids
    merges = []
    for index, merge in enumerate(vocab.merges):
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1:]
        if cut < 0 or left not in known or right not in known or left + right not in known:
            raise TokenizerError(f"tokenizer.ggml.merges[{index}] = {merge!r} is not \"a b\" with a, b and "
                                 "ab all in the vocabulary")
        merges.append((left, right))
    pre = _PRE_TOKENIZERS[vocab.pre]
    model = models.BPE(vocab=known, merges=merges, ignore_merges=pre.ignore_merges)
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in pre.patterns]
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return _finish(model, vocab, pre_tokenizer=pre_tokenizers.Sequence(splits))


def _byte_level_alphabet():
    """GPT-2's byte ↔ character map: printable Latin-1 bytes stand for themselves, the rest for 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 256
    for b in range(256):
        if b not in chars:
            chars[b] = chr(shifted)
            shifted += 1
    return "".join(chars[b] for b in range(256))


_BYTE_TO_CHAR = _byte_level_alphabet()
# Alphabet characters become the Latin-1 character of their byte; other Latin-1 characters become one
# that Latin-1 cannot encode, so such a token takes the slow path.
_CHAR_TO_LATIN1 = str.maketrans({**{chr(b): "\uffff" for b in range(256)},
                                 **{c: chr(b) for b, c in enumerate(_BYTE_TO_CHAR)}})


def _byte_level_decode(tokens):
    """The bytes each byte-level token stands for (a character outside the alphabet stands for its UTF-8)."""
    out = []
    for token in tokens:
        try:
            out.append(token.translate(_CHAR_TO_LATIN1).encode("latin-1"))
        except UnicodeEncodeError:
            out.append(b"".join(bytes([_BYTE_TO_CHAR.index(c)]) if c in _BYTE_TO_CHAR else c.encode()
                                for c in token))
    return out
