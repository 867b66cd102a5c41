"""Constrained decoding: a grammar or JSON schema becomes a mask over the vocabulary before sampling.

Built on llguidance (`pip install 'zephyr[structured]'`), which compiles GBNF (llama.cpp's grammar
syntax), JSON schema, Lark and regular expressions, and computes each step's token mask from a trie
of the vocabulary's bytes. zephyr hands it those bytes from its own tables (`Tokenizer.token_bytes`),
so SentencePiece and byte-level BPE vocabularies work alike.

    grammar = Grammar.from_json_schema({"type": "object", "properties": {"name": {"type": "string"}}})
    matcher = grammar.matcher(llm.tokenizer)          # one per generation: it tracks what was generated
    allowed = matcher.allowed()                       # bool [vocab]
    matcher.consume(token)

A grammar is checked when it is made, so a bad one is a ValueError before any generation starts.
"""
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .errors import MissingDependencyError

EXTRA = "pip install 'zephyr[structured]'"

# Whitespace the JSON grammars allow between tokens: JSON's own, at most 20 characters in a row, so a
# small model cannot run on through newlines forever (llama.cpp's JSON grammars bound it the same way).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,20}"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise MissingDependencyError(f"grammars, JSON schemas and tool calls need llguidance: {EXTRA}") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar (llguidance's serialised form) and where it came from, for error messages."""

    definition: str
    origin: str

    @classmethod
    def from_gbnf(cls, text: str, origin="grammar") -> "Grammar":
        """A grammar in llama.cpp's GBNF syntax (`root ::= ...`)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{origin}: a GBNF grammar must be a non-empty string")
        llg = _llguidance()
        try:
            return cls._checked(llg.grammar_from("gbnf", text), origin)
        except ValueError as exc:
            raise ValueError(f"{origin} is not a valid GBNF grammar: {_first_line(exc)}") from None

    @classmethod
    def from_lark(cls, text: str, origin="grammar") -> "Grammar":
        """A grammar in llguidance's Lark syntax (which can embed JSON schemas with `%json {...}`)."""
        return cls._checked(_llguidance().LLMatcher.grammar_from_lark(text), origin)

    @classmethod
    def from_regex(cls, pattern: str, origin="regex") -> "Grammar":
        return cls._checked(_llguidance().LLMatcher.grammar_from_regex(pattern), origin)

    @classmethod
    def from_json_schema(cls, schema, origin="schema") -> "Grammar":
        """Output that is one JSON value valid under `schema` (a dict, or its JSON text). Keywords
        llguidance cannot enforce are errors, never silently dropped. An object with `properties` and
        no `additionalProperties` takes only the properties it lists (as llama.cpp's JSON grammars and
        OpenAI's strict mode do): a model left free to add keys tends to add them forever."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{origin} is not valid JSON: {exc}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise ValueError(f"{origin} must be a JSON schema object, got {type(schema).__name__}")
        llg = _llguidance()
        options = {"whitespace_pattern": JSON_WHITESPACE}
        definition = llg.LLMatcher.grammar_from_json_schema(json.dumps(closed_objects(schema)), defaults=options)
        return cls._checked(definition, origin)

    @classmethod
    def _checked(cls, definition: str, origin: str) -> "Grammar":
        error = _llguidance().LLMatcher.validate_grammar(definition)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{origin} cannot be used: {_first_line(error)}")
        return cls(definition, origin)

    def matcher(self, tokenizer) -> "Matcher":
        """A fresh matcher of this grammar over `tokenizer`'s vocabulary."""
        return Matcher(self, tokenizer)


# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_SCHEMA_KEYWORDS = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
                    "unevaluatedItems", "unevaluatedProperties")
_LIST_KEYWORDS = ("prefixItems", "anyOf", "oneOf")
_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema):
    """`schema` with "additionalProperties": false added to every object schema that lists
    `properties` and says nothing of others (allOf members are left open: they are intersected)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_KEYWORDS:
        if key in out:
            out[key] = closed_objects(out[key])
    if isinstance(out.get("additionalProperties"), Mapping):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    for key in _LIST_KEYWORDS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _MAP_KEYWORDS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    return out


def grammar_from(grammar=None, response_format=None) -> "Grammar | None":
    """The Grammar of the `grammar=` argument (GBNF text or a Grammar) and/or an OpenAI
    `response_format`; None when neither constrains the output."""
    from_format = response_format_grammar(response_format)
    if grammar is not None and from_format is not None:
        raise ValueError("pass either grammar= or a JSON response_format, not both")
    if isinstance(grammar, str):
        return Grammar.from_gbnf(grammar)
    if grammar is not None and not isinstance(grammar, Grammar):
        raise TypeError(f"grammar must be GBNF text or a zephyr.Grammar, not {type(grammar).__name__}")
    return grammar or from_format


def response_format_grammar(response_format) -> "Grammar | None":
    """The Grammar of an OpenAI `response_format`: {"type": "text"} (none), {"type": "json_object"}
    (any JSON object), or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError(f"response_format must be an object such as {{'type': 'json_object'}}, "
                         f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.from_json_schema({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError("response_format.json_schema must be an object with 'name' and 'schema'")
        name = spec.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or \
                not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
            raise ValueError(f"response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'; "
                             f"got {name!r}")
        if spec.get("strict") not in (None, True, False):
            raise ValueError("response_format.json_schema.strict must be true or false")
        return Grammar.from_json_schema(spec["schema"], "response_format.json_schema.schema")
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


class Matcher:
    """Where one generation stands in a grammar: the tokens allowed next, and whether it may end."""

    def __init__(self, grammar: Grammar, tokenizer):
        self._vocab_size = tokenizer.vocab_size
        self._matcher = _llguidance().LLMatcher(_guidance_tokenizer(tokenizer), grammar.definition, log_level=0)
        self._check(grammar.origin)

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar accepts next (end-of-generation tokens when it may end)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[:self._vocab_size].view(bool)

    def accepts(self, token: int) -> bool:
        """Whether `token` may come next (cheaper than `allowed()` for one token)."""
        return self._matcher.validate_tokens([token]) == 1

    def consume(self, token: int):
        if not self._matcher.consume_token(token):
            self._check("the grammar")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more: the generation ends here."""
        return self._matcher.is_stopped()

    def _check(self, what):
        if self._matcher.is_error():
            raise ValueError(f"{what}: {_first_line(self._matcher.get_error())}")


# llguidance's view of a vocabulary takes ~0.5 s to build: one per Tokenizer, built on first use.
_guidance_tokenizers = weakref.WeakKeyDictionary()
_build_lock = threading.Lock()


def _guidance_tokenizer(tokenizer):
    with _build_lock:
        built = _guidance_tokenizers.get(tokenizer)
        if built is None:
            built = _guidance_tokenizers[tokenizer] = _llguidance().LLTokenizer(
                _VocabularyBytes(tokenizer), eos_token=sorted(tokenizer.eog_ids))
        return built


class _VocabularyBytes:
    """The vocabulary as llguidance's TokenizerWrapper protocol wants it: every token's bytes, control
    tokens named by their text (llguidance marks them so plain text never matches them), and a
    function that tokenizes text."""

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer):
        text, special = tokenizer.token_bytes(), tokenizer.token_bytes(special=True)
        self.tokens = [t or s for t, s in zip(text, special)]
        self.special_token_ids = [i for i, (t, s) in enumerate(zip(text, special)) if not t and s]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_continuation(text)


def _first_line(error) -> str:
    """llguidance's errors carry a parser-state dump after the first line."""
    return str(error).strip().split("\n")[0]
