"""Chat prompts: turning a list of messages into the one string a model was trained to continue.

A prompt comes from one of two places:

* a Jinja template, usually the GGUF key ``tokenizer.chat_template``. Templates inside model
  files are untrusted input, so they run in zephyr.template_sandbox;
* a built-in named format (``zephyr``, ``chatml``, ``llama-2``, ``mistral-instruct``, ``gemma``),
  each a small Python function, for files that carry no template.

Templates that have no system role (they never read a system message's content) get the system
message merged into the next one, as llama.cpp does.

``resolve_chat_format`` picks one: an explicit ``chat_format`` wins, then the file's template,
then a format recognised from ``general.name``.
"""
import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from . import template_sandbox
from .errors import ChatTemplateError


Builder = Callable[..., str]  # build(messages, add_generation_prompt, **extra) -> prompt


@dataclass(frozen=True)
class ChatFormat:
    """A named way to render messages, and the strings that end an assistant turn.

    ``build(messages, add_generation_prompt, **extra)`` receives messages already validated by
    ``render``; ``extra`` holds caller variables such as ``tools`` (built-in formats ignore them).
    """

    name: str
    build: Builder
    stop: tuple[str, ...] = ()
    source: str | None = None   # the Jinja template, for formats made from one

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt for ``messages``; with ``add_generation_prompt`` it ends where the assistant's
        reply begins. Any BOS text the format emits is included: tokenize it with special tokens
        parsed and without adding a second BOS."""
        return self.build(_validated(messages), add_generation_prompt, **extra)


def _validated(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"message {i} needs a str 'role' (such as 'user'), got {role!r}")
        if "content" not in message:
            raise ChatTemplateError(f"message {i} ({role}) has no 'content'; use None for a message without text")
        content = message["content"]
        if content is not None and not isinstance(content, str):
            raise ChatTemplateError(
                f"message {i} ({role}) has content of type {type(content).__name__}; it must be a str or None")
    return [dict(message) for message in messages]


# ---- the registry of named formats -------------------------------------------------------------

CHAT_FORMATS: dict[str, ChatFormat] = {}


def register_chat_format(name: str, build: Builder, stop: Sequence[str] = (), replace: bool = False) -> ChatFormat:
    """Make ``build`` available as ``chat_format=name``. Built-in formats are registered this way too."""
    if name in CHAT_FORMATS and not replace:
        raise ChatTemplateError(f"chat format {name!r} is already registered; pass replace=True to override it")
    fmt = ChatFormat(name, build, tuple(stop))
    CHAT_FORMATS[name] = fmt
    return fmt


def _text(message) -> str:
    return message["content"] or ""


def _check_roles(messages, allowed, format_name):
    for i, message in enumerate(messages):
        if message["role"] not in allowed:
            raise ChatTemplateError(
                f"the {format_name} format has no role {message['role']!r} (message {i}); "
                f"it knows {', '.join(allowed)}")


def zephyr_prompt(messages, add_generation_prompt=True, **_extra) -> str:
    """Zephyr-7B-beta: ``<|role|>\\n{content}</s>\\n`` per message."""
    _check_roles(messages, ("system", "user", "assistant"), "zephyr")
    prompt = "".join(f"<|{m['role']}|>\n{_text(m)}</s>\n" for m in messages)
    return prompt + "<|assistant|>\n" if add_generation_prompt else prompt


def chatml_prompt(messages, add_generation_prompt=True, **_extra) -> str:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, any role."""
    prompt = "".join(f"<|im_start|>{m['role']}\n{_text(m)}<|im_end|>\n" for m in messages)
    return prompt + "<|im_start|>assistant\n" if add_generation_prompt else prompt


def _instruction_turns(messages, format_name):
    """(system text or None, [(user, assistant or None), ...]) for the [INST] formats, which have
    no system role of their own and need user and assistant turns to alternate."""
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = _text(messages[0]), messages[1:]
    turns = []
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ChatTemplateError(
                f"the {format_name} format needs an optional system message, then user and assistant "
                f"messages alternating from user; message {i + (system is not None)} is "
                f"{message['role']!r}, expected {expected!r}")
        if expected == "user":
            turns.append([_text(message), None])
        else:
            turns[-1][1] = _text(message)
    if not turns:
        raise ChatTemplateError(f"the {format_name} format needs at least one user message")
    return system, turns


def llama2_prompt(messages, add_generation_prompt=True, **_extra) -> str:
    """Meta's Llama-2-chat format; the system message is folded into the first user turn.
    The prompt always ends ready for the assistant, so ``add_generation_prompt`` changes nothing."""
    system, turns = _instruction_turns(messages, "llama-2")
    parts = []
    for i, (user, assistant) in enumerate(turns):
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        parts.append(f"<s>[INST] {user} [/INST]")
        if assistant is not None:
            parts.append(f" {assistant} </s>")
    return "".join(parts)


def mistral_instruct_prompt(messages, add_generation_prompt=True, **_extra) -> str:
    """Mistral-7B-Instruct v0.1; a system message is prepended to the first user message.
    The prompt always ends ready for the assistant, so ``add_generation_prompt`` changes nothing."""
    system, turns = _instruction_turns(messages, "mistral-instruct")
    parts = ["<s>"]
    for i, (user, assistant) in enumerate(turns):
        if i == 0 and system is not None:
            user = f"{system}\n\n{user}"
        parts.append(f"[INST] {user} [/INST]")
        if assistant is not None:
            parts.append(f"{assistant}</s>")
    return "".join(parts)


def gemma_prompt(messages, add_generation_prompt=True, **_extra) -> str:
    """Google's Gemma (2, 3): ``<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n`` per message,
    content trimmed. Gemma has no system role: as in Gemma 3's own template, a system message goes in
    front of the first user message, followed by ``"\\n\\n"``."""
    system, turns = _instruction_turns(messages, "gemma")
    parts = ["<bos>"]
    for i, (user, assistant) in enumerate(turns):
        prefix = f"{system}\n\n" if i == 0 and system is not None else ""
        parts.append(f"<start_of_turn>user\n{prefix}{user.strip()}<end_of_turn>\n")
        if assistant is not None:
            parts.append(f"<start_of_turn>model\n{assistant.strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


register_chat_format("zephyr", zephyr_prompt, stop=("</s>",))
register_chat_format("chatml", chatml_prompt, stop=("<|im_end|>",))
register_chat_format("llama-2", llama2_prompt, stop=("</s>",))
register_chat_format("mistral-instruct", mistral_instruct_prompt, stop=("</s>",))
register_chat_format("gemma", gemma_prompt, stop=("<end_of_turn>",))


# ---- Jinja templates ----------------------------------------------------------------------------

class _JinjaBuild:
    """A ChatFormat's build function that renders a Jinja template in the sandbox."""

    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str):
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.template = template_sandbox.compile_template(source, origin)

    def __call__(self, messages, add_generation_prompt=True, **extra) -> str:
        if messages and messages[0]["role"] == "system" and not _reads_system_message(self.template):
            messages = _system_merged_into_next(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        return template_sandbox.render(self.template, variables, self.origin)


class _WatchedMessage(dict):
    """A message that notes whether a template read its content."""

    content_read = False

    def __getitem__(self, key):
        self.content_read |= key == "content"
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.content_read |= key == "content"
        return super().get(key, default)

    def items(self):
        self.content_read = True
        return super().items()

    def values(self):
        self.content_read = True
        return super().values()


@functools.lru_cache(maxsize=32)
def _reads_system_message(template) -> bool:
    """Whether a template supports the system role, decided as llama.cpp decides it: rendered with a
    system and a user message, a template that never reads the system message's content (Gemma's and
    Mistral v0.2's refuse the role; others skip it) does not."""
    system = _WatchedMessage(role="system", content="System message")
    probe = {"messages": [system, {"role": "user", "content": "User message"}], "tools": [],
             "bos_token": "", "eos_token": "", "add_generation_prompt": True}
    try:
        template_sandbox.render(template, probe, "the probe")
    except ChatTemplateError:
        pass   # one that refuses the role often raises before reading it
    return system.content_read


def _system_merged_into_next(messages):
    """llama.cpp's remedy for a template without a system role: the system text goes in front of the
    next message's, after a newline (and is dropped if nothing follows)."""
    system, rest = messages[0], messages[1:]
    if not rest:
        return rest
    merged = dict(rest[0], content=f"{_text(system)}\n{_text(rest[0])}")
    return [merged, *rest[1:]]


def chat_format_from_template(source: str, *, name: str = "custom", origin: str | None = None,
                              bos_token: str = "", eos_token: str = "",
                              stop: Sequence[str] | None = None) -> ChatFormat:
    """A ChatFormat that renders the Jinja template ``source`` in the sandbox.

    The template sees ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``
    (so it can emit them itself; pass ``bos_token=""`` to ``render`` to keep it out),
    ``raise_exception(message)``, ``strftime_now(format)``, the ``tojson`` filter, and any extra
    keyword variables given to ``render``. ``origin`` names the template in error messages;
    ``stop`` defaults to the EOS text.
    """
    if not isinstance(source, str):
        raise ChatTemplateError(f"a chat template must be a str, got {type(source).__name__}")
    template = _JinjaBuild(source, origin or f"chat template {name!r}", bos_token, eos_token)
    if stop is None:
        stop = (eos_token,) if eos_token else ()
    return ChatFormat(name, template, tuple(stop), source)


# ---- choosing a format for a model -------------------------------------------------------------

# general.name words (lowercased, all must appear) -> format, first match wins. For GGUF files
# converted before chat templates were stored, such as Zephyr-7B-beta's from 2023.
_NAME_HINTS = (
    (("zephyr",), "zephyr"),
    (("gemma",), "gemma"),
    (("mistral", "instruct"), "mistral-instruct"),
    (("llama-2", "chat"), "llama-2"),
    (("llama2", "chat"), "llama-2"),
)


def _looks_like_template(text: str) -> bool:
    return "{%" in text or "{{" in text


def _token_text(metadata: Mapping, id_key: str) -> str:
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_id = metadata.get(id_key)
    if isinstance(token_id, int) and isinstance(tokens, (list, tuple)) and 0 <= token_id < len(tokens):
        return tokens[token_id]
    return ""


def format_from_model_name(model_name: str | None) -> str | None:
    """The built-in format a ``general.name`` suggests, or None."""
    lowered = (model_name or "").lower()
    for words, format_name in _NAME_HINTS:
        if all(word in lowered for word in words):
            return format_name
    return None


def resolve_chat_format(metadata: Mapping, chat_format: "str | ChatFormat | None" = None) -> ChatFormat:
    """The ChatFormat for a model, given its GGUF metadata.

    In order: ``chat_format`` (a ChatFormat, a registered name, a name ``X`` the file stores as
    ``tokenizer.chat_template.X``, or a Jinja template string), then the file's
    ``tokenizer.chat_template``, then a format recognised from ``general.name``.
    """
    model_name = metadata.get("general.name")
    model = f"model {model_name!r}" if model_name else "the model"
    bos = _token_text(metadata, "tokenizer.ggml.bos_token_id")
    eos = _token_text(metadata, "tokenizer.ggml.eos_token_id")
    stop = tuple(dict.fromkeys(t for t in (eos, _token_text(metadata, "tokenizer.ggml.eot_token_id")) if t))

    def from_template(source, name, origin):
        return chat_format_from_template(source, name=name, origin=origin, bos_token=bos, eos_token=eos, stop=stop)

    if isinstance(chat_format, ChatFormat):
        return chat_format
    if chat_format is not None:
        if not isinstance(chat_format, str):
            raise ChatTemplateError(
                f"chat_format must be a name, a Jinja template or a ChatFormat, got {type(chat_format).__name__}")
        if _looks_like_template(chat_format):
            return from_template(chat_format, "custom", "the template passed as chat_format")
        if chat_format in CHAT_FORMATS:
            return CHAT_FORMATS[chat_format]
        key = f"tokenizer.chat_template.{chat_format}"
        if isinstance(metadata.get(key), str):
            return from_template(metadata[key], chat_format, f"{key} of {model}")
        raise ChatTemplateError(
            f"unknown chat_format {chat_format!r}: use one of {_known_names()}, or pass a Jinja template string")

    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        return from_template(template, "gguf", f"tokenizer.chat_template of {model}")

    recognised = format_from_model_name(model_name)
    if recognised is not None and recognised in CHAT_FORMATS:
        return CHAT_FORMATS[recognised]

    raise ChatTemplateError(
        f"{model} has no tokenizer.chat_template and its general.name does not identify a known format; "
        f"pass chat_format= one of {_known_names()}, or a Jinja template string")


def _known_names() -> str:
    return ", ".join(repr(name) for name in CHAT_FORMATS)
