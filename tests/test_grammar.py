"""Grammars and JSON schemas as token masks (zephyr.grammar), on a SentencePiece and a byte-level BPE
vocabulary, without a model: a generation fed random logits must still produce valid output."""
import builtins
import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from test_tokenizer import _mistral_metadata  # noqa: E402

from zephyr import Tokenizer  # noqa: E402
from zephyr.generation import Generation, GenerationSettings  # noqa: E402
from zephyr.grammar import Grammar, grammar_from, response_format_grammar  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["spm", "bpe"])
def tokenizer(request, mistral_vocab_path, smollm2_path):
    if request.param == "spm":
        return Tokenizer.from_metadata(_mistral_metadata(mistral_vocab_path))
    return Tokenizer.from_gguf(smollm2_path)


def run(tokenizer, grammar, seed, temperature=1.0, max_new_tokens=400):
    """Generate under `grammar` from random logits: (text, finish reason)."""
    rng = np.random.default_rng(seed)
    settings = GenerationSettings(grammar=grammar, temperature=temperature, top_k=0, top_p=1.0, seed=seed,
                                  repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    generation = Generation(tokenizer, settings)
    text = ""
    while not generation.finished:
        text += generation.step(rng.normal(0, 3, tokenizer.vocab_size).astype(np.float32)).text
    return text, generation.finish_reason


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_under_a_schema_give_valid_json(tokenizer, seed):
    text, finish = run(tokenizer, Grammar.from_json_schema(PERSON), seed)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_greedy_under_a_schema_gives_valid_json(tokenizer):
    text, finish = run(tokenizer, Grammar.from_json_schema(PERSON), 0, temperature=0)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_gbnf_is_followed_and_its_end_ends_the_generation(tokenizer):
    grammar = Grammar.from_gbnf('root ::= "The answer is " ("yes" | "no") "."')
    for seed in range(3):
        text, finish = run(tokenizer, grammar, seed)
        assert text in ("The answer is yes.", "The answer is no.") and finish == "stop"


def test_the_mask_admits_exactly_the_tokens_that_fit(tokenizer):
    matcher = Grammar.from_gbnf("root ::= [a-c] [0-9]+").matcher(tokenizer)
    allowed = matcher.allowed()
    expected = {i for i, b in enumerate(tokenizer.token_bytes()) if re.fullmatch(rb"[a-c][0-9]*", b)}
    assert set(np.flatnonzero(allowed)) == expected and len(expected) >= 3
    assert not any(allowed[i] for i in tokenizer.eog_ids)   # the grammar cannot end yet


def test_max_new_tokens_first_reports_length(tokenizer):
    text, finish = run(tokenizer, Grammar.from_json_schema(PERSON), 1, max_new_tokens=5)
    assert finish == "length" and text and not text.endswith("}")


def test_response_formats():
    assert response_format_grammar(None) is None and response_format_grammar({"type": "text"}) is None
    assert isinstance(response_format_grammar({"type": "json_object"}), Grammar)
    spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert isinstance(response_format_grammar(spec), Grammar)
    for bad, message in [
        ({"type": "xml"}, "response_format.type must be"),
        ({"type": "json_schema"}, "must be an object with 'name' and 'schema'"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name must be"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict"),
        ("json", "response_format must be an object"),
    ]:
        with pytest.raises(ValueError, match=message):
            response_format_grammar(bad)
    with pytest.raises(ValueError, match="either grammar= or a JSON response_format"):
        grammar_from('root ::= "a"', {"type": "json_object"})


@pytest.mark.parametrize("schema, message", [
    ({"type": "strin"}, "schema cannot be used: .*strin"),
    ({"type": "string", "format": "shoe-size"}, "schema cannot be used: .*shoe-size"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "schema cannot be used"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "schema cannot be used: .*if"),
    ("{not json", "schema is not valid JSON"),
    (["a list"], "must be a JSON schema object"),
])
def test_bad_or_unsupported_schemas_are_errors_never_unconstrained(schema, message):
    with pytest.raises(ValueError, match=message):
        Grammar.from_json_schema(schema)


@pytest.mark.parametrize("text, message", [
    ('root ::= "yes" | no', "not a valid GBNF grammar: .*no"),
    ("root ::= (", "not a valid GBNF grammar"),
    ("", "non-empty"),
])
def test_bad_gbnf_is_an_error_naming_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        Grammar.from_gbnf(text)


def test_without_llguidance_the_error_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_llguidance(name, *args, **kwargs):
        if name == "llguidance":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_llguidance)
    with pytest.raises(ImportError, match=r"pip install 'zephyr\[structured\]'"):
        Grammar.from_gbnf('root ::= "a"')
