"""Text ↔ token ids for a GGUF model, built from the vocabulary in the file's metadata.

Two vocabulary kinds (`tokenizer.ggml.model`):

- "llama": SentencePiece BPE (Llama, Mistral, Zephyr). Spaces are written "▁" and one "▁" is put in
  front of the text; pieces merge by score (the pair whose concatenation scores highest merges
  first); characters with no piece fall back to the `<0xNN>` byte tokens.
- "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen2, DeepSeek, Falcon, Command-R, SmolLM, ...). A regex
  pre-tokenizer, chosen by `tokenizer.ggml.pre` as llama.cpp chooses it, splits the text into words;
  each byte becomes one printable character; words merge by the ranked merge list.

Encoding runs on Hugging Face `tokenizers`, built in memory from the metadata. Decoding does not
need it: every id maps to the bytes it stands for, so decoding is a table look-up and a UTF-8
decode, and streaming is the same with an incremental UTF-8 decoder.

Rendering follows llama.cpp: control tokens (BOS, EOS, <|im_end|>, ...) are parsed in text and
rendered in output only with `special=True` (so are unknown tokens); user-defined tokens always are.
So do the token types and attributes llama.cpp decides by token text or model name: end-of-generation
and fill-in-the-middle texts are control tokens, and Phi-3's special tokens swallow the ASCII
whitespace after them.
"""
import codecs
import operator
import re
import threading

import numpy as np
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

# Token texts llama.cpp recognises whatever the file says, treating each as a control token. End of
# generation: the eos/eot/eom ids and tokens with one of these texts ...
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<end_of_utterance>", "<|return|>", "<|call|>", "<|calls|>", "<|flush|>",
    "</s>", "<eos>", "<turn|>", "<|tool_response>", "[e~[", "<\uff5cend\u2581of\u2581sentence\uff5c>",
})
# ... and the fill-in-the-middle tokens, by metadata id or else by text (the first of these found);
# the pad, repository and file-separator ones end generation too.
FIM_TOKEN_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")
# gpt-oss's message-structure tokens: always parsed and rendered, as user-defined tokens.
USER_DEFINED_TOKEN_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")

# Pre-tokenizer regexes, as llama.cpp runs them (src/llama-vocab.cpp). Each list is applied in order,
# every pattern splitting the words of the one before; the text between matches stays a word too.
# llama.cpp's regex engine sees only the category of a character outside ASCII, so where a Hugging
# Face original splits letters by case (\p{Lu}, \p{Ll}, ...) llama.cpp does not: `_letters_by_category`
# writes those classes as \p{L}. Its contractions are spelled out ('[sS]) rather than (?i:'s), which
# would also fold letters such as U+017F into ASCII. Its `$` is the end of the word: \z here.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                           r"|\s+(?!\S)|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
                           r"|\s+(?!\S)|\s+")
_JAIS2 = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                          r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)"
                          r"|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
_MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SEED_CODER = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
                               r"|\s+(?!\S)|\s+")
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
_EXAONE_MOE = _CONTRACTIONS + (r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                               r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
# Letters split at a lower -> upper case change, in llama.cpp's form (ASCII case only, see above).
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GRANITE_EMBED = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+" + _CONTRACTIONS + "?"
                  r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*" + _CONTRACTIONS + "?"
                  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_CASED_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?")
_YOUTU = _CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TINY_AYA = _CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Punctuation glued to a following ASCII word, letters with their marks (DeepSeek V3 and its relatives).
_PUNCT_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPARK_WORDS = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+")
# Runs of digits in groups of three counted from the right: 1234567 -> 1 234 567.
_DIGITS_BY_THOUSANDS = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
_HAN_KANA = r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+"
# Patterns without \p{..} classes see, in llama.cpp, a text whose non-ASCII spaces became \v, so a
# range holding a space (U+3000 in \x{800}-\x{4E00} and \x{3000}-\x{3002}) never matches it: "&&\S".
_CJK_HANGUL = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}&&\S]+"
_DEEPSEEK_LETTERS = (
    r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}"
    r"\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}"
    r"\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}"
    r"\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}"
    r"\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}"
    r"\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}"
    r"\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}"
    r"\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}"
    r"\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}"
    r"\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}"
    r"\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}"
    r"\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}"
    r"\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+")
_DEEPSEEK_PUNCT = r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}&&\S]+"
_AFMOE_SCRIPTS = (r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{8C48}-\x{FAFF}\x{3040}-\x{309F}\x{30A0}-\x{30FF}"
                  r"\x{FF65}-\x{FF9F}\x{2F00}-\x{2FDF}\x{E40}-\x{E7F}\x{E80}-\x{EFF}\x{1780}-\x{17FF}\x{1000}-\x{109F}"
                  r"\x{AA60}-\x{AA7F}\x{A9E0}-\x{A9FF}\x{AC00}-\x{D7AF}\x{1100}-\x{11FF}]+")
_YOUTU_SCRIPTS = (r"[\x{AC00}-\x{D7A3}\x{3131}-\x{318E}]+|[\x{FF01}\x{2026}\x{201C}\x{201D}\x{2018}\x{2019}\x{2014}"
                  r"\x{FF1A}\x{FF1B}\x{FF0C}\x{3001}-\x{303F}\x{FE30}-\x{FE4F}]+|[\x{3105}-\x{312F}]+|" + _HAN_KANA)
_PORO = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+"
_LINES = r"[^\n]+|[\n]+"


class _PreTokenizer:
    def __init__(self, patterns, ignore_merges=False, add_bos=False):
        self.patterns = patterns              # applied in order, each refining the previous split
        self.ignore_merges = ignore_merges    # a word that is itself a token is taken whole
        self.add_bos = add_bos                # llama.cpp's default when add_bos_token is absent


def _letters_by_category(pattern):
    return re.sub(r"\\p\{L[ultmo]\}", r"\\p{L}", pattern)


def _kind(*patterns, ignore_merges=False, add_bos=False):
    return _PreTokenizer(tuple(map(_letters_by_category, patterns)), ignore_merges, add_bos)


_DIGITS_THEN_GPT2 = _kind(r"\p{N}", _GPT2)
_LLAMA3_KIND = _kind(_LLAMA3, ignore_merges=True, add_bos=True)
_PRE_TOKENIZER_KINDS = {
    ("default",): _kind(r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "gigachat", "a.x-4.0",
     "mellum", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "modern-bert"): _kind(_GPT2),
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano"): _LLAMA3_KIND,
    ("dbrx", "smaug-bpe", "chatglm-bpe"): _kind(_LLAMA3),
    ("glm4", "glm5"): _kind(_LLAMA3, ignore_merges=True),
    ("jais-2",): _kind(_JAIS2),
    ("falcon",): _kind(r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"): _DIGITS_THEN_GPT2,
    ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
     "grok-2"): _kind(_QWEN2),
    ("qwen35",): _kind(_QWEN35),
    ("laguna",): _kind(_LINES, _QWEN2),
    ("deepseek-llm",): _kind(r"[\r\n]", _DEEPSEEK_LETTERS, _DEEPSEEK_PUNCT, r"\s+\z", _CJK_HANGUL, r"\p{N}+"),
    ("deepseek-coder",): _kind(r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"),
    ("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"): _kind(r"\p{N}{1,3}", _HAN_KANA, _PUNCT_WORDS),
    ("spark2_5",): _kind(r"\p{N}{1,3}", _HAN_KANA, _SPARK_WORDS, r"\p{N}"),
    ("afmoe",): _kind(_DIGITS_BY_THOUSANDS, _AFMOE_SCRIPTS, _PUNCT_WORDS),
    ("youtu",): _kind(_YOUTU_SCRIPTS, _YOUTU, ignore_merges=True),
    ("tiny_aya", "cohere2moe"): _kind(_DIGITS_BY_THOUSANDS, _TINY_AYA),
    ("tekken",): _kind(_TEKKEN, ignore_merges=True, add_bos=True),
    ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"): _kind(_GPT4O),
    ("granite-embed-multi-97m",): _kind(_GRANITE_EMBED, ignore_merges=True),
    ("minicpm5",): _kind(r"\p{N}{1,3}", _MINICPM5, ignore_merges=True),
    ("seed-coder",): _kind(_SEED_CODER),
    ("bailingmoe", "bailingmoe2", "llada-moe"): _kind(_BAILINGMOE),
    ("ufakzeka",): _kind(_UFAKZEKA),
    ("exaone-moe",): _kind(_EXAONE_MOE),
    ("poro-chat", "bloom", "gpt3-finnish"): _kind(_PORO),
    ("viking",): _kind(_PORO, r"\p{N}"),
    ("chameleon",): _kind(r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )",
                          r"\p{N}", r"[\p{P}!-/:-@\[-`{-~]", _GPT2, add_bos=True),
}
_PRE_TOKENIZERS = {name: kind for names, kind in _PRE_TOKENIZER_KINDS.items() for name in names}
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
        # special=False / True -> the function dropping the whitespace that tokens with the lstrip and
        # rstrip attributes swallow where they are matched, or None
        self._strip_around = {special: _whitespace_stripper(vocab, special) for special in (False, True)}
        # No token stands for more characters of text than its own text has, so a text of n characters
        # is at least n / max_token_chars tokens. None: no such bound, because a llama vocabulary
        # without byte tokens fuses a run of unknown characters, however long, into one <unk>, and
        # tokens that swallow whitespace stand for any amount of it.
        fuses_unknown = vocab.model == "llama" and BYTE not in vocab.types
        swallows = bool(vocab.lstrip_ids or vocab.rstrip_ids)
        self.max_token_chars = None if fuses_unknown or swallows else max(map(len, vocab.tokens))

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
        strip_around = self._strip_around[bool(special)]
        if strip_around is not None:
            text = strip_around(text)
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

    def __init__(self, model, pre, tokens, types, scores, merges, special_ids, add_bos, add_eos, add_space_prefix,
                 model_name="", architecture=""):
        self.model = model
        self.pre = pre
        self.tokens = tokens
        self.scores = scores
        self.merges = merges
        self.ids = {text: i for i, text in enumerate(tokens)}   # a repeated text maps to its last id
        self.special_ids = special_ids
        self.types = list(types)
        self.eog_ids = self._override_by_text()
        self.bos_id = special_ids["bos"]
        self.eos_id = special_ids["eos"]
        self.unknown_id = special_ids["unknown"]
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        # The "▁" put in front of the text comes back as a space at the start of the output.
        self.strip_first_space = model == "llama" and add_space_prefix
        self.rstrip_ids, self.lstrip_ids = self._stripping_tokens(model_name.lower(), architecture)

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
        for name in ("bos", "eos", "unknown", "padding", "eot", "eom", *FIM_TOKEN_TEXTS):
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
                   add_space_prefix=bool(get("add_space_prefix", model == "llama")),
                   model_name=str(metadata.get("general.name") or ""),
                   architecture=str(metadata.get("general.architecture") or ""))

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

    def _override_by_text(self):
        """What llama.cpp decides by token text: the token types it overrides (in self.types), the
        fill-in-the-middle ids the file did not give (in self.special_ids), and the returned
        end-of-generation ids."""
        ids, types = self.ids, self.types
        by_text = {ids[text] for text in EOG_TOKEN_TEXTS if text in ids}
        eog = set(by_text)
        for name, texts in FIM_TOKEN_TEXTS.items():
            if self.special_ids[name] is None:
                found = next((ids[text] for text in texts if text in ids), None)
                if found is not None:
                    self.special_ids[name] = found
                    by_text.add(found)
            if name in FIM_EOG:
                eog.add(self.special_ids[name])
        for i in by_text:
            types[i] = CONTROL
        for text in USER_DEFINED_TOKEN_TEXTS:
            if text in ids:
                types[ids[text]] = USER_DEFINED
        eog |= {self.special_ids[name] for name in ("eos", "eot", "eom")}
        eog.discard(None)

        eog_texts = {self.tokens[i] for i in eog}
        end = ids.get("<|end|>")
        if end in eog and eog_texts & {"<|call|>", "<|calls|>"} and eog_texts & {"<|return|>", "<|flush|>"}:
            # gpt-oss (and Solar Open) end a message with <|end|>, the turn with <|return|> or <|call|>
            eog.discard(end)
            types[end] = USER_DEFINED
        closing = ids.get("</s>")
        if closing in eog and eog_texts & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(closing)   # a normal token in these vocabularies
            types[closing] = NORMAL
        return frozenset(eog)

    def _stripping_tokens(self, model_name, architecture):
        """Ids of the special tokens that swallow the whitespace after / before them when matched in text.
        GGUF files do not store this; llama.cpp hard-codes it by model name, and so does this."""
        ids = self.ids
        special = {i for i, kind in enumerate(self.types) if kind in (CONTROL, USER_DEFINED, UNKNOWN)}
        rstrip, lstrip = set(), set()
        if any(name in (self.pre or "") for name in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
                name in architecture for name in ("nomic-bert-moe", "jina-bert-v3")):
            lstrip = {ids["<mask>"]} if "<mask>" in ids else set()
        elif "phi-3" in model_name or "phi3" in model_name:
            rstrip = special - {ids[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in ids}
        elif "modern-bert" in model_name:
            lstrip = {ids["[MASK]"]} if "[MASK]" in ids else set()
        return frozenset(rstrip), frozenset(lstrip & special)


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


def _whitespace_stripper(vocab, special):
    """text -> text without the whitespace that lstrip / rstrip tokens swallow where they are matched
    (control tokens only with `special`), or None if there are none. llama.cpp strips ASCII whitespace
    only; Hugging Face's AddedToken(rstrip=True) would also strip U+00A0, U+3000, ..."""
    kinds = (CONTROL, UNKNOWN, USER_DEFINED) if special else (USER_DEFINED,)
    matched = [i for i, kind in enumerate(vocab.types) if kind in kinds]
    if not any(i in vocab.lstrip_ids or i in vocab.rstrip_ids for i in matched):
        return None
    texts = sorted({vocab.tokens[i] for i in matched}, key=len, reverse=True)   # leftmost, then longest
    lstrip = {vocab.tokens[i] for i in vocab.lstrip_ids}
    rstrip = {vocab.tokens[i] for i in vocab.rstrip_ids}
    pattern = re.compile(f"([ \t\n\v\f\r]*)({'|'.join(map(re.escape, texts))})([ \t\n\v\f\r]*)")

    def keep(match):
        before, token, after = match.groups()
        return ("" if token in lstrip else before) + token + ("" if token in rstrip else after)
    return lambda text: pattern.sub(keep, text)


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
    ids, cuts = [], []   # the merges as (piece, cut): no strings kept until the order is known
    for piece, i in normal.items():
        if len(piece) > MAX_MERGED_PIECE_CHARS:
            continue   # every cut costs a copy: a megabyte-long piece would take minutes
        for cut in range(1, len(piece)):
            if piece[:cut] in normal and piece[cut:] in normal:
                ids.append(i)
                cuts.append(cut)
    ids, cuts = np.array(ids, np.int64), np.array(cuts, np.int64)
    order = np.lexsort((cuts, ids, -np.asarray(scores, np.float64)[ids]))   # last key first
    return [(tokens[i][:cut], tokens[i][cut:]) for i, cut in zip(ids[order].tolist(), cuts[order].tolist())]


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
