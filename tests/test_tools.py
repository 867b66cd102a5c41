"""Function calling pieces (zephyr.tools): tool definitions, tool_choice, the conversation with the
built-in tool prompt or a template's own, the call grammars, and finding calls in streamed text."""
import json

import pytest

from zephyr.chat import chat_format_from_template, resolve_chat_format
from zephyr.tools import (CLOSE, OPEN, CallParser, ToolChoice, call_grammar, conversation, parse_tool_choice,
                          parse_tools, template_handles_tools, tool_prompt)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = parse_tools([WEATHER, TIME])

# The tool parts of Qwen2.5's chat template, reduced: it renders `tools` and writes calls as <tool_call>.
QWEN_LIKE = (
    "{%- if tools %}<|im_start|>system\nTools:\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call them inside <tool_call></tool_call> tags.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content or '' }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endfor %}<|im_start|>assistant\n")


def test_tools_and_tool_choice_are_checked():
    assert [t.name for t in TOOLS] == ["get_weather", "get_time"]
    assert parse_tool_choice(None, TOOLS) == ToolChoice("auto") and parse_tool_choice(None, ()) == ToolChoice("none")
    assert parse_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS) == \
        ToolChoice("required", "get_time")
    with pytest.raises(ValueError, match="names the function 'nope', which is not among the tools"):
        parse_tool_choice({"type": "function", "function": {"name": "nope"}}, TOOLS)
    with pytest.raises(ValueError, match="tool_choice 'required' needs tools"):
        parse_tool_choice("required", ())
    with pytest.raises(ValueError, match="tool_choice must be"):
        parse_tool_choice("sometimes", TOOLS)
    for bad, message in [([{"type": "function"}], r"tools\[0\] must be"),
                         ([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\].function.name"),
                         ([WEATHER, WEATHER], r"tools\[1\].function.name 'get_weather' is used by an earlier"),
                         ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
                         ("get_weather", "tools must be a list")]:
        with pytest.raises(ValueError, match=message):
            parse_tools(bad)


def test_the_builtin_tool_prompt_and_history():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "2", "content": "rainy"},
    ]
    out = conversation(messages, TOOLS, native=False)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n") and tool_prompt(TOOLS) in out[0]["content"]
    assert json.dumps(WEATHER) in out[0]["content"]
    assert out[2]["content"] == (f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}\n'
                                 f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Rome"}}}}\n{CLOSE}')
    assert out[3]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
    # any template renders it, even one that knows only system, user and assistant
    resolve_chat_format({}, "zephyr").render(out)
    assert conversation([{"role": "user", "content": "hi"}], TOOLS, native=False)[0]["role"] == "system"
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls\[0\].function.arguments is not valid JSON"):
        conversation([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{oops"}}]}], TOOLS, native=False)


def test_a_template_that_handles_tools_renders_them_itself():
    qwen = chat_format_from_template(QWEN_LIKE)
    assert template_handles_tools(qwen) and not template_handles_tools(resolve_chat_format({}, "chatml"))
    history = [{"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    messages = conversation(history, TOOLS, native=True)
    # arguments as an object, as Hugging Face templates expect them
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    text = qwen.render(messages, tools=[t.as_openai() for t in TOOLS])
    assert '"name": "get_weather"' in text and '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\nsunny" in text and "You may call functions" not in text


def feed(parser, pieces):
    content, calls = "", []
    for piece in pieces:
        text, found = parser.push(piece)
        content += text
        calls += found
    return content + parser.flush(), calls


def test_calls_are_found_in_streamed_text_whatever_the_split():
    reply = (f'Let me check.{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}\n'
             f'{OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CLOSE}')
    for size in (1, 3, 7, len(reply)):
        content, calls = feed(CallParser(TOOLS), [reply[i:i + size] for i in range(0, len(reply), size)])
        assert content == "Let me check."
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                     ("get_time", {})]
        assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_text_that_is_not_a_call_stays_content():
    for reply in ["a < b, and <tool", f'{OPEN}{{"name": "unknown", "arguments": {{}}}}{CLOSE}',
                  f"{OPEN}not json{CLOSE}", f'{OPEN}\n{{"name": "get_weather", "argu']:
        content, calls = feed(CallParser(TOOLS), [reply])
        assert content == reply and calls == []


def test_call_grammars(smollm2_path):
    pytest.importorskip("llguidance")
    from zephyr import Tokenizer
    tokenizer = Tokenizer.from_gguf(smollm2_path)

    def accepts(grammar, text):
        matcher = grammar.matcher(tokenizer)
        for token in tokenizer.encode_continuation(text):
            if not matcher.accepts(token):
                return False
            matcher.consume(token)
        return True

    good = f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}'
    bad_arguments = f'{OPEN}\n{{"name": "get_weather", "arguments": {{"town": "Paris"}}}}\n{CLOSE}'
    other = f'{OPEN}\n{{"name": "get_time", "arguments": {{}}}}\n{CLOSE}'
    required = call_grammar(TOOLS, ToolChoice("required"))
    assert accepts(required, good) and accepts(required, other) and accepts(required, good + "\n" + other)
    assert not accepts(required, bad_arguments) and not accepts(required, "Sure")
    named = call_grammar(TOOLS, ToolChoice("required", "get_time"))
    assert accepts(named, other) and not accepts(named, good) and not accepts(named, other + "\n" + other)
    auto = call_grammar(TOOLS, ToolChoice("auto"))
    assert accepts(auto, "Just text, no call.") and accepts(auto, "Checking. " + good)
    assert not accepts(auto, "Checking. " + bad_arguments)
    assert call_grammar(TOOLS, ToolChoice("none")) is None
    with pytest.raises(ValueError, match=r"tools\[0\].function.parameters cannot be used"):
        call_grammar(parse_tools([{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}]),
            ToolChoice("required"))
