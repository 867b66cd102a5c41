"""Chat prompts: built-in formats, sandboxed GGUF templates, and how a format is chosen."""
import time
from pathlib import Path

import pytest

from zephyr import template_sandbox
from zephyr.chat import (CHAT_FORMATS, ChatFormat, chat_format_from_template, register_chat_format,
                         resolve_chat_format)
from zephyr.errors import ChatTemplateError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]

EXPECTED = {
    "zephyr": (
        "<|system|>\nYou are terse.</s>\n"
        "<|user|>\nHi!</s>\n"
        "<|assistant|>\nHello.</s>\n"
        "<|user|>\nWhat is 2+2?</s>\n"
        "<|assistant|>\n"
    ),
    "chatml": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>"
        "<s>[INST] What is 2+2? [/INST]"
    ),
    "mistral-instruct": (
        "<s>[INST] You are terse.\n\nHi! [/INST]Hello.</s>"
        "[INST] What is 2+2? [/INST]"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
}

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Zephyr-7B-beta's template, laid out one tag per line as Hugging Face ships it: trim_blocks and
# lstrip_blocks must eat the newlines after block tags, and keep those after {{ }}.
ZEPHYR_TEMPLATE = r"""{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# Gemma 3's template (google/gemma-3-*-it): it folds a system message into the first user turn itself.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Mistral-7B-Instruct-v0.2's template: user and assistant roles only.
MISTRAL_V02_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"   # copied from llama.cpp's models/templates


def family_template(name, **kwargs):
    return chat_format_from_template((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"), name=name, **kwargs)


TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>"]


def metadata(**extra):
    """GGUF metadata shaped like a Llama-family file: <s> and </s> are tokens 1 and 2."""
    return {"tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, **extra}


def render_template(source, messages=CONVERSATION, **kwargs):
    return chat_format_from_template(source, name="test", origin="the test template").render(messages, **kwargs)


# ---- built-in formats --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_format_renders_canonical_prompt(name):
    assert CHAT_FORMATS[name].render(CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name, stop", [("zephyr", ("</s>",)), ("chatml", ("<|im_end|>",)),
                                        ("llama-2", ("</s>",)), ("mistral-instruct", ("</s>",)),
                                        ("gemma", ("<end_of_turn>",))])
def test_builtin_format_stop_strings(name, stop):
    assert CHAT_FORMATS[name].name == name
    assert CHAT_FORMATS[name].stop == stop


def test_builtin_formats_without_system_message():
    messages = [{"role": "user", "content": "Hi!"}]
    assert CHAT_FORMATS["zephyr"].render(messages) == "<|user|>\nHi!</s>\n<|assistant|>\n"
    assert CHAT_FORMATS["llama-2"].render(messages) == "<s>[INST] Hi! [/INST]"
    assert CHAT_FORMATS["mistral-instruct"].render(messages) == "<s>[INST] Hi! [/INST]"


def test_builtin_formats_without_generation_prompt():
    messages = CONVERSATION[:3]
    assert CHAT_FORMATS["zephyr"].render(messages, add_generation_prompt=False) == (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n")
    assert CHAT_FORMATS["chatml"].render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert CHAT_FORMATS["llama-2"].render(messages, add_generation_prompt=False) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi! [/INST] Hello. </s>")


def test_none_content_renders_empty_in_builtin_formats():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]
    assert CHAT_FORMATS["chatml"].render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


@pytest.mark.parametrize("name", ["llama-2", "mistral-instruct", "gemma"])
@pytest.mark.parametrize("messages", [
    [{"role": "assistant", "content": "first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "system", "content": "only a system message"}],
])
def test_instruction_formats_need_alternating_turns(name, messages):
    with pytest.raises(ChatTemplateError, match=name):
        CHAT_FORMATS[name].render(messages)


def test_zephyr_format_rejects_unknown_role():
    with pytest.raises(ChatTemplateError, match="'tool'"):
        CHAT_FORMATS["zephyr"].render([{"role": "tool", "content": "42"}])


def test_register_chat_format():
    def shout(messages, add_generation_prompt=True, **extra):
        return "".join(m["content"].upper() for m in messages) + extra.get("suffix", "")

    try:
        fmt = register_chat_format("test-shout", shout, stop=["!"])
        assert CHAT_FORMATS["test-shout"] is fmt
        assert resolve_chat_format({}, "test-shout").render([{"role": "user", "content": "hi"}], suffix="?") == "HI?"
        assert fmt.stop == ("!",)
        with pytest.raises(ChatTemplateError, match="already registered"):
            register_chat_format("test-shout", shout)
        assert register_chat_format("test-shout", shout, replace=True) is CHAT_FORMATS["test-shout"]
    finally:
        CHAT_FORMATS.pop("test-shout", None)


# ---- Jinja templates ---------------------------------------------------------------------------

def test_smollm2_template_adds_default_system_prompt():
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]
    assert render_template(SMOLLM2_TEMPLATE, messages) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_smollm2_template_keeps_given_system_prompt():
    assert render_template(SMOLLM2_TEMPLATE) == EXPECTED["chatml"]
    assert render_template(SMOLLM2_TEMPLATE, add_generation_prompt=False) == (
        EXPECTED["chatml"].removesuffix("<|im_start|>assistant\n"))


def test_real_smollm2_file_uses_its_template(smollm2_path):
    from zephyr import gguf

    with gguf.read(smollm2_path) as model:
        fmt = resolve_chat_format(model.metadata)
    assert fmt.name == "gguf"
    assert fmt.stop == ("<|im_end|>",)
    assert fmt.render(CONVERSATION) == EXPECTED["chatml"]


def test_real_gemma3_270m_file_chats_in_gemma_format(gemma3_270m_path):
    """The file carries no template: the format comes from general.name 'Gemma 3 270m', and renders as
    Gemma 3's own template does with the file's <bos>."""
    from zephyr import gguf
    from zephyr.tokenizer import Tokenizer

    with gguf.read(gemma3_270m_path) as model:
        assert "tokenizer.chat_template" not in model.metadata
        fmt = resolve_chat_format(model.metadata)
        template = resolve_chat_format(model.metadata, GEMMA3_TEMPLATE)
        tokenizer = Tokenizer.from_gguf(model)
    assert fmt is CHAT_FORMATS["gemma"]
    assert fmt.render(CONVERSATION) == template.render(CONVERSATION) == EXPECTED["gemma"]
    ids = tokenizer.encode(fmt.render(CONVERSATION), add_bos=False, special=True)
    start, end = tokenizer.token_to_id("<start_of_turn>"), tokenizer.token_to_id("<end_of_turn>")
    assert ids[:3] == [tokenizer.bos_id, start, tokenizer.token_to_id("user")]
    assert (ids.count(tokenizer.bos_id), ids.count(start), ids.count(end)) == (1, 4, 3)
    assert tokenizer.is_eog(end) and "<end_of_turn>" in fmt.stop


def test_zephyr_jinja_template_matches_builtin_format():
    fmt = resolve_chat_format(metadata(**{"tokenizer.chat_template": ZEPHYR_TEMPLATE}))
    assert fmt.stop == ("</s>",)
    assert fmt.render(CONVERSATION) == EXPECTED["zephyr"]
    assert fmt.render(CONVERSATION[:3], add_generation_prompt=False) == (
        CHAT_FORMATS["zephyr"].render(CONVERSATION[:3], add_generation_prompt=False))


def test_template_can_emit_bos_and_eos_from_metadata():
    source = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    fmt = resolve_chat_format(metadata(), source)
    assert fmt.render(CONVERSATION[1:3]) == "<s>Hi!</s>Hello.</s>"


def test_caller_can_keep_bos_out_of_the_prompt():
    fmt = resolve_chat_format(metadata(), "{{ bos_token }}{{ messages[0].content }}")
    assert fmt.render(CONVERSATION, bos_token="") == "You are terse."


def test_special_tokens_default_to_empty_without_vocabulary():
    fmt = resolve_chat_format({}, "[{{ bos_token }}|{{ eos_token }}]")
    assert fmt.render([]) == "[|]"
    assert fmt.stop == ()


def test_eot_token_is_also_a_stop_string():
    meta = metadata(**{"tokenizer.ggml.eot_token_id": 3, "tokenizer.chat_template": "{{ messages|length }}"})
    assert resolve_chat_format(meta).stop == ("</s>", "<|im_end|>")


def test_extra_variables_tojson_and_strftime_now():
    source = ("{{ tools|tojson }}|{{ tools|tojson(indent=2) }}|{{ date_string }}|"
              "{{ strftime_now('%Y') }}|{{ not_given }}|{% for m in messages %}{% if loop.index > 1 %}{% break %}"
              "{% endif %}{{ m.role }}: {{ m.content }}{% endfor %}")
    tools = [{"name": "météo", "n": 1}]
    year = time.strftime("%Y")
    assert render_template(source, tools=tools, date_string="26 Jul 2024") == (
        '[{"name": "météo", "n": 1}]|'
        '[\n  {\n    "name": "météo",\n    "n": 1\n  }\n]|'
        f'26 Jul 2024|{year}||system: You are terse.')


def test_extra_keys_of_messages_reach_the_template():
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert render_template("{{ messages[0].tool_calls[0].name }}|{{ messages[0].content }}", messages) == "f|None"


def test_raise_exception_carries_the_template_message():
    source = "{% if messages|length > 2 %}{{ raise_exception('Too many messages') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="the test template refused these messages: Too many messages"):
        render_template(source)


def test_tojson_writes_iterators_as_arrays():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "str"}}},
             {"type": "code_interpreter"}]
    source = ("{{ tools|map(attribute='type')|tojson }}|{{ tools|selectattr('function')|map(attribute='function')"
              "|map(attribute='name')|tojson }}|{{ tools|map(attribute='function')|select|list|length }}")
    assert render_template(source, tools=tools) == '["function", "code_interpreter"]|["get_weather"]|1'


def test_deepseek_r1_template_lists_tools_through_map_and_tojson():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    prompt = family_template("llama-cpp-deepseek-r1").render(CONVERSATION[1:2], tools=tools)
    assert ('requests: [\n  {\n    "name": "get_weather",\n    "parameters": {\n      "type": "object"\n'
            '    }\n  }\n]\n') in prompt
    assert prompt.endswith("<｜User｜>Hi!<｜end▁of▁sentence｜><｜Assistant｜><think>\n")


SYSTEM_THEN_USER = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]


@pytest.mark.parametrize("source, expected", [
    # these read no system message: llama.cpp merges it into the next one, after "\n"
    (MISTRAL_V02_TEMPLATE, "<s>[INST] Be terse.\nHi! [/INST]"),
    ((TEMPLATES / "google-gemma-2-2b-it.jinja").read_text(),
     "<s><start_of_turn>user\nBe terse.\nHi!<end_of_turn>\n<start_of_turn>model\n"),
    ("{% for m in messages if m.role != 'system' %}[{{ m.role }}: {{ m.content }}]{% endfor %}",
     "[user: Be terse.\nHi!]"),
    # these read it, and keep it their own way
    (GEMMA3_TEMPLATE, "<s><start_of_turn>user\nBe terse.\n\nHi!<end_of_turn>\n<start_of_turn>model\n"),
    ((TEMPLATES / "microsoft-Phi-3.5-mini-instruct.jinja").read_text(),
     "<|system|>\nBe terse.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"),
    ((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(),
     "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"),
    ("{{ messages|tojson }}", '[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]'),
])
def test_system_message_of_templates_without_a_system_role(source, expected):
    fmt = chat_format_from_template(source, bos_token="<s>", eos_token="</s>")
    assert fmt.render(SYSTEM_THEN_USER) == expected


def test_merged_system_message_keeps_the_rest_of_the_conversation():
    fmt = chat_format_from_template(MISTRAL_V02_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert fmt.render(CONVERSATION) == "<s>[INST] You are terse.\nHi! [/INST]Hello.</s>[INST] What is 2+2? [/INST]"
    assert fmt.render([{"role": "system", "content": "alone"}]) == "<s>"   # nothing to merge into: dropped
    assert fmt.render(CONVERSATION[1:]) == "<s>[INST] Hi! [/INST]Hello.</s>[INST] What is 2+2? [/INST]"


def test_gemma_format_equals_gemma3_template():
    template = chat_format_from_template(GEMMA3_TEMPLATE, bos_token="<bos>", eos_token="<eos>")
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3],
                     [{"role": "user", "content": "  padded  "}, {"role": "assistant", "content": "\nreply\n"}]]
    for messages in conversations:
        for add_generation_prompt in (True, False):
            assert CHAT_FORMATS["gemma"].render(messages, add_generation_prompt) == template.render(
                messages, add_generation_prompt)


def test_gemma_format_matches_llama_cpp_builtin_gemma():
    """llama.cpp's own "gemma" format (llama_chat_apply_template) merges the system message the same
    way; it leaves BOS to the tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    for messages in (CONVERSATION, CONVERSATION[1:]):
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *(llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages))
        buffer = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_chat_apply_template(b"gemma", chat, len(messages), True, buffer, len(buffer))
        assert CHAT_FORMATS["gemma"].render(messages) == "<bos>" + buffer.raw[:n].decode()


def test_syntax_error_names_origin_and_line():
    why = r"tokenizer.chat_template of model 'Broken' is not valid Jinja: line 2"
    with pytest.raises(ChatTemplateError, match=why):
        resolve_chat_format(metadata(**{"general.name": "Broken", "tokenizer.chat_template": "ok\n{% if %}"}))


def test_runtime_error_names_origin():
    with pytest.raises(ChatTemplateError, match="the test template failed while rendering: ZeroDivisionError"):
        render_template("{{ 1 // 0 }}")


def test_compiled_once_per_source():
    first = chat_format_from_template(SMOLLM2_TEMPLATE)
    second = chat_format_from_template(SMOLLM2_TEMPLATE)
    assert first.build.template is second.build.template


# ---- the sandbox -------------------------------------------------------------------------------

@pytest.fixture
def blocked(security_tally):
    """Call once per hostile template the sandbox stopped (counted in the run's summary)."""
    key = "chat template payloads blocked"
    return lambda: security_tally.__setitem__(key, security_tally.get(key, 0) + 1)


@pytest.mark.parametrize("payload", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ joiner.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch {marker}') }}",
    "{% set x = namespace() %}{{ x.__class__ }}",
    "{{ lipsum.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ ().__class__.__base__.__subclasses__()[0].__init__.__globals__ }}",
    "{{ loop.__class__ }}{% for m in messages %}{{ loop.__init__.__globals__ }}{% endfor %}",
    # __getitem__ and subscript tricks
    "{{ ''['__class__'] }}",
    "{{ messages['__class__'] }}",
    "{{ messages[0]|attr('__getitem__') }}",
    "{{ messages.__getitem__(0) }}",
    "{{ messages[0].items()|list|first|attr('__class__') }}",
    # .mro() and friends
    "{{ dict.mro() }}",
    "{{ namespace.mro() }}",
    "{{ (1).real.__class__.mro() }}",
    # format strings: attribute and item lookups inside fields
    "{{ '{0[__class__]}'.format(messages) }}",
    "{{ '{0.role.__class__}'.format(messages[0]) }}",
    "{{ '{x.__class__}'.format_map({'x': 1}) }}",
    "{{ '{0:{1.__class__}}'.format(1, 2) }}",
    "{{ '%s'|format(cycler.__init__) }}",
    # filters that look attributes up by name
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ messages|map('attr', '__class__')|list }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ messages|sort(attribute='__class__') }}",
    "{{ messages|groupby('__class__') }}",
    "{{ messages|sum(attribute='__class__') }}",
    "{{ messages|join(attribute='__class__') }}",
    "{{ messages|unique(attribute='__class__')|list }}",
    # the globals and the template's own objects
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ joiner().__call__.__globals__ }}",
    "{% for m in messages %}{{ loop.cycle.__func__ }}{% endfor %}",
    "{{ raise_exception.__code__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ ''.__doc__ }}",
    # mutation of what the caller passed
    "{{ messages.pop() }}",
    "{{ messages.clear() }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ messages[0].setdefault('x', 1) }}",
    "{% set ns = namespace() %}{% set ns.__init__ = 1 %}{{ ns.__init__ }}",
])
def test_sandbox_refuses_escape_payloads(payload, tmp_path, blocked):
    marker = tmp_path / "pwned"
    source = payload.replace("{marker}", str(marker))
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        resolve_chat_format(metadata(**{"tokenizer.chat_template": source})).render(CONVERSATION)
    assert not marker.exists()
    blocked()


PAYLOAD = "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}{% for i in range(10**9) %}{% endfor %}"


@pytest.mark.parametrize("fmt", [chat_format_from_template(SMOLLM2_TEMPLATE), CHAT_FORMATS["chatml"],
                                 CHAT_FORMATS["zephyr"], CHAT_FORMATS["llama-2"]], ids=lambda f: f.name)
def test_template_syntax_in_messages_is_text_not_code(fmt, tmp_path, blocked):
    """Message content and extra keys are data: a template never evaluates them a second time."""
    payload = PAYLOAD.replace("{marker}", str(tmp_path / "pwned"))
    messages = [{"role": "system", "content": payload}, {"role": "user", "content": payload, "name": payload}]
    prompt = fmt.render(messages)
    assert prompt.count(payload) == 2 and not (tmp_path / "pwned").exists()
    blocked()


def test_tools_are_data_and_guarded_like_messages(tmp_path, blocked):
    payload = PAYLOAD.replace("{marker}", str(tmp_path / "pwned"))
    tools = [{"name": payload, "__class__": "a key, not an attribute", "parameters": {"x": {"type": "string"}}}]
    source = "{{ tools|tojson }}|{% for t in tools %}{{ t.name }}|{{ t['__class__'] }}{% endfor %}"
    out = render_template(source, tools=tools)
    assert payload in out and "a key, not an attribute" in out and not (tmp_path / "pwned").exists()
    for escape in ("{{ tools.__class__ }}", "{{ tools[0].__class__ }}", "{{ tools[0].name.__class__.__mro__ }}",
                   "{{ tools.append(1) }}", "{{ tools[0].pop('name') }}"):
        with pytest.raises(ChatTemplateError, match="sandbox forbids"):
            render_template(escape, tools=tools)
        blocked()
    assert tools[0]["name"] == payload


@pytest.mark.parametrize("source", ["{% include '/etc/passwd' %}", "{% import 'os' as os %}",
                                    "{% extends '/etc/hostname' %}", "{% from '/etc/passwd' import x %}"])
def test_templates_cannot_load_other_files(source, blocked):
    with pytest.raises(ChatTemplateError) as info:
        render_template(source)
    assert "root:" not in str(info.value)
    blocked()


def test_sandbox_keeps_caller_data_immutable():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        render_template("{{ messages.append({'role': 'user', 'content': 'injected'}) }}", messages)
    assert messages == [{"role": "user", "content": "hi"}]


DOUBLING = "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s OP ns.s %}{% endfor %}"


@pytest.mark.parametrize("source, why", [
    ("{% for i in range(10**9) %}x{% endfor %}", "the number 1000000000"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations and calls"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed"),
    ("{{ 'x' * 10**7 }}", "repeated a value"),
    ("{{ ([1, 2] * 900000)|length }}", "repeated a value"),
    (DOUBLING.replace("OP", "~"), "value of more"),
    (DOUBLING.replace("OP", "+"), "value of more"),
    ("{{ 'x'|center(10**10) }}", "the number 10000000000"),
    ("{{ 'x'.ljust(10**10) }}", "the number 10000000000"),
    ("{{ 10 ** 100000 }}", "integer of more than"),
    # padding widths inside format strings: once folded at compile time, or allocated before the size check
    ("{{ '{:>999999999}'.format('x') }}", "the number 999999999"),
    ("{{ '{:{w}}'.format('x', w=999999999) }}", "the number 999999999"),
    ("{{ '{x:>99999999}'.format_map({'x': 1}) }}", "the number 99999999"),
    ("{{ '%999999999s' % 'x' }}", "the number 999999999"),
    ("{{ '%*s' % (999999999, 'x') }}", "the number 999999999"),
    ("{{ '%(a)999999999s' % {'a': 1} }}", "the number 999999999"),
    ("{{ '%999999999s'|format('x') }}", "the number 999999999"),
    # string arguments that multiply: refused before the result is built
    ("{{ ('x' * 30000)|replace('x', 'y' * 30000) }}", "would build"),
    ("{{ ('x' * 30000).replace('', 'y' * 30000) }}", "would build"),
    ("{{ (range(999)|list)|join('x' * 999999) }}", "would build"),
    ("{{ ('x' * 999999).join(range(999)|map('string')) }}", "would build"),
    ("{{ ('a\\n' * 3000)|indent('y' * 3000) }}", "would build"),
    ("{{ messages|tojson(indent=' ' * 999999) }}", "JSON indent"),
    ("{% set ns = namespace(x=range(99999)|list) %}{% for i in range(300) %}{% set ns.x = [ns.x] %}{% endfor %}"
     "{{ ns.x|tojson(indent=16) }}", "JSON passed"),
    # single calls whose work grows faster than their output
    ("{{ lipsum(999999) }}", "lipsum"),
    ("{{ ('x' * 999999)|wordwrap(1) }}", "wrapped more than"),
])
def test_sandbox_limits_stop_runaway_templates_quickly(source, why, blocked):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=why):
        render_template(source)
    assert time.perf_counter() - start < 10
    blocked()


def test_time_limit_stops_slow_steps(monkeypatch):
    """Each step here is a linear scan of a list: within the step budget, but minutes in all."""
    monkeypatch.setattr(template_sandbox, "MAX_TEMPLATE_SECONDS", 0.5)
    source = "{% set s = range(99999)|list %}{% for i in range(99999) %}{% if -1 in s %}{% endif %}{% endfor %}"
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="ran for more than 0.5 seconds"):
        render_template(source)
    assert time.perf_counter() - start < 5


def test_guarded_filters_still_work():
    source = ("{{ '%s-%03d'|format('a', 7) }}|{{ '%s!' % 'hi' }}|{{ '{:>4}|{:.2f}'.format('x', 2.5) }}|"
              "{{ 'a-b'|replace('-', '+') }}|{{ 'a-b'.replace('-', '') }}|{{ ['x', 'y']|join(', ') }}|"
              "{{ ', '.join(['x', 'y']) }}|{{ 'a\\nb'|indent(2) }}|{{ 'a b c'|wordwrap(3) }}|"
              "{{ lipsum(1)|length > 0 }}|"
              "{{ {'k': [1]}|tojson(indent=2) }}|{{ 7 % 3 }}")
    assert render_template(source) == ('a-007|hi!|   x|2.50|a+b|ab|x, y|x, y|a\n  b|a b\nc|True|'
                                       '{\n  "k": [\n    1\n  ]\n}|1')


def test_step_budget_stops_exponential_recursion(monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_TEMPLATE_STEPS", 5_000)
    source = "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    with pytest.raises(ChatTemplateError, match="loop iterations and calls"):
        render_template(source)


def test_budget_is_per_render(monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_TEMPLATE_STEPS", 50)
    fmt = chat_format_from_template("{% for i in range(40) %}.{% endfor %}")
    assert fmt.render([]) == fmt.render([]) == "." * 40


def test_infinite_recursion_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match="RecursionError"):
        render_template("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")


# ---- message validation ------------------------------------------------------------------------

@pytest.mark.parametrize("messages, why", [
    ("hello", "must be a list"),
    ([("user", "hi")], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0 needs a str 'role'"),
    ([{"role": "user", "content": "a"}, {"role": 3, "content": "hi"}], "message 1 needs a str 'role'"),
    ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "content of type list"),
])
@pytest.mark.parametrize("fmt", [CHAT_FORMATS["chatml"], chat_format_from_template(SMOLLM2_TEMPLATE)],
                         ids=["builtin", "template"])
def test_bad_messages_are_rejected(fmt, messages, why):
    with pytest.raises(ChatTemplateError, match=why):
        fmt.render(messages)


# ---- choosing the format -----------------------------------------------------------------------

ZEPHYR_BETA_2023 = metadata(**{"general.name": "huggingfaceh4_zephyr-7b-beta"})


def test_explicit_name_beats_file_template():
    fmt = resolve_chat_format(metadata(**{"tokenizer.chat_template": SMOLLM2_TEMPLATE}), chat_format="llama-2")
    assert fmt is CHAT_FORMATS["llama-2"]


def test_explicit_template_string_beats_file_template():
    fmt = resolve_chat_format(metadata(**{"tokenizer.chat_template": SMOLLM2_TEMPLATE}),
                              chat_format="{% for m in messages %}{{ m.content }};{% endfor %}")
    assert fmt.name == "custom"
    assert fmt.render(CONVERSATION) == "You are terse.;Hi!;Hello.;What is 2+2?;"


def test_explicit_chat_format_object_is_used_as_is():
    assert resolve_chat_format({}, CHAT_FORMATS["chatml"]) is CHAT_FORMATS["chatml"]


def test_explicit_name_of_a_template_stored_in_the_file():
    meta = metadata(**{"tokenizer.chat_template": SMOLLM2_TEMPLATE,
                       "tokenizer.chat_template.tool_use": "tools: {{ tools|length }}"})
    fmt = resolve_chat_format(meta, "tool_use")
    assert fmt.name == "tool_use"
    assert fmt.render(CONVERSATION, tools=[1, 2]) == "tools: 2"


def test_file_template_beats_general_name():
    fmt = resolve_chat_format({**ZEPHYR_BETA_2023, "tokenizer.chat_template": SMOLLM2_TEMPLATE})
    assert fmt.name == "gguf"
    assert fmt.render(CONVERSATION) == EXPECTED["chatml"]


def test_zephyr_beta_2023_file_is_recognised_by_name():
    fmt = resolve_chat_format(ZEPHYR_BETA_2023)
    assert fmt is CHAT_FORMATS["zephyr"]
    assert fmt.render(CONVERSATION) == EXPECTED["zephyr"]


@pytest.mark.parametrize("general_name, expected", [
    ("TheBloke_Zephyr-7B-Alpha", "zephyr"),
    ("mistralai_mistral-7b-instruct-v0.1", "mistral-instruct"),
    ("LLaMA-2-7B-Chat", "llama-2"),
    ("meta-llama_llama2-13b-chat-hf", "llama-2"),
    ("Gemma 3 270m", "gemma"),
    ("gemma-2-2b-it", "gemma"),
])
def test_formats_recognised_from_general_name(general_name, expected):
    assert resolve_chat_format(metadata(**{"general.name": general_name})) is CHAT_FORMATS[expected]


@pytest.mark.parametrize("general_name", ["mistral-7b-v0.1", "llama-2-7b", None])
def test_unrecognised_model_without_template_is_an_error(general_name):
    meta = metadata() if general_name is None else metadata(**{"general.name": general_name})
    with pytest.raises(ChatTemplateError, match="chat_format=") as excinfo:
        resolve_chat_format(meta)
    for name in EXPECTED:
        assert repr(name) in str(excinfo.value)


def test_unknown_explicit_name_lists_known_formats():
    with pytest.raises(ChatTemplateError, match="unknown chat_format 'vicuna'.*'chatml'"):
        resolve_chat_format(ZEPHYR_BETA_2023, "vicuna")


def test_chat_format_is_a_frozen_value():
    fmt = CHAT_FORMATS["chatml"]
    assert isinstance(fmt, ChatFormat)
    with pytest.raises(AttributeError):
        fmt.name = "other"
