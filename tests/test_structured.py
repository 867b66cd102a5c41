"""Structured output, tools, logprobs and logit_bias through the Python API, on the demo model at
temperature 0: what comes back parses, validates, and streams the same."""
import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from zephyr import AutoModelForCausalLM, Config, Grammar  # noqa: E402

SCHEMAS = {
    "required fields": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 24}}, "required": ["name", "age", "city"]},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]}},
        "required": ["color", "size"]},
    "arrays": {"type": "object", "properties": {
        "fruits": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 2, "maxItems": 4}},
        "required": ["fruits"]},
    "nested objects": {"type": "object", "properties": {
        "book": {"type": "object", "properties": {
            "title": {"type": "string", "maxLength": 40},
            "author": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 20},
                                                        "last": {"type": "string", "maxLength": 20}},
                       "required": ["first", "last"]}},
            "required": ["title", "author"]}},
        "required": ["book"]},
}
PROMPTS = {"required fields": "Describe a person as JSON.", "enums": "Pick a T-shirt as JSON.",
           "arrays": "List some fruits as JSON.", "nested objects": "Describe a famous book as JSON."}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 60},
                                                    "results": {"type": "integer", "minimum": 1, "maximum": 10}},
                   "required": ["query", "results"]}}}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), context_length=1024) as model:
        yield model


def ask(content):
    return [{"role": "user", "content": content}]


def json_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("kind", SCHEMAS)
def test_json_schema_replies_parse_and_validate_streamed_or_not(llm, kind):
    schema = SCHEMAS[kind]
    reply = llm.create_chat_completion(ask(PROMPTS[kind]), temperature=0, max_tokens=200,
                                       response_format=json_format(schema))
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    chunks = list(llm.create_chat_completion(ask(PROMPTS[kind]), temperature=0, max_tokens=200, stream=True,
                                             response_format=json_format(schema)))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_json_object_and_the_other_entry_points(llm):
    # (a prompt this small model answers briefly: asked for "one key", it nests objects until max_tokens)
    reply = llm.create_chat_completion(ask("What is the capital of France? Answer in JSON."),
                                       temperature=0, max_tokens=120,
                                       response_format={"type": "json_object"})
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(reply["choices"][0]["message"]["content"]), dict)
    schema = SCHEMAS["enums"]
    text = llm.chat(ask(PROMPTS["enums"]), temperature=0, max_new_tokens=60, response_format=json_format(schema))
    jsonschema.validate(json.loads(text), schema)
    grammar = Grammar.from_json_schema(schema)
    text = llm("A T-shirt as JSON:", grammar=grammar, temperature=0, max_new_tokens=60)
    jsonschema.validate(json.loads(text), schema)
    tokens = list(llm.generate(llm.tokenize("A T-shirt as JSON:"), grammar=grammar, temperature=0))
    assert llm.detokenize(tokens) == text     # the grammar's end ends generate() too


def test_gbnf_grammars_everywhere(llm):
    yes_no = 'root ::= ("yes" | "no") "."'
    answers = {"yes.", "no."}
    assert llm("Is the sky blue? Answer:", grammar=yes_no, temperature=0) in answers
    assert llm.chat(ask("Is the sky blue?"), grammar=yes_no, temperature=0) in answers
    tokens = llm.generate(llm.tokenize("Is the sky blue?"), grammar=yes_no, temperature=0)
    assert llm.detokenize(list(tokens)) in answers
    reply = llm.create_completion("Is the sky blue? Answer:", grammar=yes_no, temperature=0)
    assert reply["choices"][0]["text"] in answers and reply["choices"][0]["finish_reason"] == "stop"
    reply = llm.create_chat_completion(ask("Is the sky blue?"), grammar=yes_no, temperature=0)
    assert reply["choices"][0]["message"]["content"] in answers
    sampled = {llm("Is the sky blue? Answer:", grammar=yes_no, temperature=1.5, seed=s) for s in range(6)}
    assert sampled <= answers


def test_reaching_max_tokens_under_a_schema_reports_length(llm):
    reply = llm.create_chat_completion(ask(PROMPTS["nested objects"]), temperature=0, max_tokens=6,
                                       response_format=json_format(SCHEMAS["nested objects"]))
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")
    assert reply["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("question, tool", [
    ("Is it cold in Oslo today?", WEATHER), ("Find me recipes for pancakes.", SEARCH)])
def test_a_named_tool_call_always_has_valid_arguments(llm, question, tool):
    name = tool["function"]["name"]
    reply = llm.create_chat_completion(ask(question), temperature=0, max_tokens=120, tools=[WEATHER, SEARCH],
                                       tool_choice={"type": "function", "function": {"name": name}})
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == name
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    chunks = list(llm.create_chat_completion(ask(question), temperature=0, max_tokens=120, tools=[WEATHER, SEARCH],
                                             tool_choice={"type": "function", "function": {"name": name}},
                                             stream=True))
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [(d["index"], d["function"]["name"], d["function"]["arguments"]) for d in deltas] == \
        [(0, name, call["function"]["arguments"])]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_required_calls_and_a_conversation_with_tool_results(llm):
    reply = llm.create_chat_completion(ask("What's the weather in Rome?"), temperature=0, max_tokens=80,
                                       tools=[WEATHER, SEARCH], tool_choice="required", parallel_tool_calls=False)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
    call = choice["message"]["tool_calls"][0]
    spec = {"get_weather": WEATHER, "search": SEARCH}[call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), spec["function"]["parameters"])
    history = ask("What's the weather in Rome?") + [choice["message"],
                                                     {"role": "tool", "tool_call_id": call["id"], "content": "22 C"}]
    answer = llm.create_chat_completion(history, temperature=0, max_tokens=30, tools=[WEATHER, SEARCH])
    assert answer["choices"][0]["message"]["content"] and answer["usage"]["prompt_tokens"] > 100
    none = llm.create_chat_completion(ask("What's the weather in Rome?"), temperature=0, max_tokens=30,
                                      tools=[WEATHER], tool_choice="none")
    assert "tool_calls" not in none["choices"][0]["message"]


def test_logprobs_and_logit_bias(llm):
    reply = llm.create_chat_completion(ask("Say hello."), temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    content = reply["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == reply["choices"][0]["message"]["content"]
    for entry in content:
        assert bytes(entry["bytes"]).decode() == entry["token"] and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] and entry["logprob"] <= 0
    first = llm.tokenize(reply["choices"][0]["message"]["content"], add_bos_token=False)[0]
    banned = llm.create_chat_completion(ask("Say hello."), temperature=0, max_tokens=8, logit_bias={first: -100})
    assert llm.tokenize(banned["choices"][0]["message"]["content"], add_bos_token=False)[0] != first
    completion = llm.create_completion("The capital of France is", temperature=0, max_tokens=4, logprobs=2)
    logprobs = completion["choices"][0]["logprobs"]
    assert "".join(logprobs["tokens"]) == completion["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0 and all(len(top) in (2, 3) for top in logprobs["top_logprobs"])
    assert llm("The capital of France is", temperature=0, max_new_tokens=3, logit_bias={first: -100})


@pytest.mark.parametrize("call, message", [
    (lambda llm: llm.create_chat_completion(ask("hi"), n=0), "n must be an integer from 1 to 16, got 0"),
    (lambda llm: llm.create_completion("hi", n=17), "n must be an integer from 1 to 16, got 17"),
    (lambda llm: llm.create_chat_completion(ask("hi"), logprobs=True, top_logprobs=21), "top_logprobs must be"),
    (lambda llm: llm.create_chat_completion(ask("hi"), top_logprobs=2), "top_logprobs needs logprobs"),
    (lambda llm: llm.create_completion("hi", logprobs=6), "logprobs must be an integer from 0 to 5"),
    (lambda llm: llm.create_chat_completion(ask("hi"), tools=[WEATHER],
                                            tool_choice={"type": "function", "function": {"name": "nope"}}), "nope"),
    (lambda llm: llm.create_chat_completion(ask("hi"), response_format=json_format({"type": "object", "properties": {
        "a": {"type": "string", "format": "shoe-size"}}})), "shoe-size"),
    (lambda llm: llm.create_chat_completion(ask("hi"), tools=[WEATHER], response_format={"type": "json_object"}),
     "tools cannot be combined"),
    (lambda llm: llm("hi", grammar="root ::= nothing"), "not a valid GBNF grammar"),
    (lambda llm: llm("hi", logit_bias={10**7: 1}), "outside this model's vocabulary"),
    (lambda llm: llm("hi", presence_penalty=5), "presence_penalty must be between"),
])
def test_bad_requests_are_value_errors_naming_the_problem(llm, call, message):
    with pytest.raises(ValueError, match=message):
        call(llm)


def test_unknown_arguments_are_refused(llm):
    with pytest.raises(TypeError):
        llm.create_chat_completion(ask("hi"), mirostat_mode=2)
    with pytest.raises(TypeError, match="unknown generation setting"):
        llm("hi", typical_p=0.5)


@pytest.mark.parametrize("field, value", [("mmap", False), ("mlock", True)])
def test_config_switches_zephyr_cannot_honour_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}={value} is not supported"):
        Config(**{field: value})
    with pytest.raises(ValueError, match=f"{field}={value} is not supported"):
        Config().updated(**{field: value})
