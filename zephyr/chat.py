"""Chat prompts: turning a list of messages into the one string a model was trained to continue.

A prompt comes from one of two places:

* a Jinja template, usually the GGUF key ``tokenizer.chat_template``. Templates inside model
  files are untrusted input, so they run in a sandbox: Jinja's immutable sandbox (no dunder
  attributes, no mutation of lists or dicts) plus limits on work and size, see ``_Sandbox``;
* a built-in named format (``zephyr``, ``chatml``, ``llama-2``, ``mistral-instruct``), each a
  small Python function, for files that carry no template.

``resolve_chat_format`` picks one: an explicit ``chat_format`` wins, then the file's template,
then a format recognised from ``general.name``.
"""
import contextvars
import functools
import json
import re
import string
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Mapping, Sequence, Sized

from jinja2 import TemplateSyntaxError, nodes, pass_context, pass_environment, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.filters import do_format, do_indent, do_join, do_replace, do_wordwrap
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from .errors import ChatTemplateError

# A prompt is tokenized and fed to the model, so anything near this size is already useless.
MAX_PROMPT_CHARS = 1_000_000
# Loop iterations plus calls (functions, methods, macros, filters) in one render. Real templates
# spend one to a few per message; a runaway loop or recursion spends it all within about a second.
MAX_TEMPLATE_STEPS = 200_000
# Widths, counts and repeat factors handed to functions and filters; stops `'x'.center(10**10)`
# and `items|slice(10**9)` before they allocate or loop.
MAX_NUMBER_ARGUMENT = 1_000_000
# Integer results of `*` and `**`; stops `10 ** 100000` and repeated squaring in a loop.
MAX_INTEGER_BITS = 4096
# Wall-clock time of one render. Steps are cheap but not free (`x in big_list` in a loop costs a
# millisecond per step); real templates render in milliseconds.
MAX_TEMPLATE_SECONDS = 5.0
# Text handed to `wordwrap`, whose cost grows with the square of a word's length.
MAX_WORDWRAP_CHARS = 100_000
# `tojson(indent=...)`: each level of nesting repeats the indent on every line.
MAX_JSON_INDENT = 16
# Words `lipsum()` may generate (n paragraphs of up to `max` words).
MAX_LIPSUM_WORDS = 10_000


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


register_chat_format("zephyr", zephyr_prompt, stop=("</s>",))
register_chat_format("chatml", chatml_prompt, stop=("<|im_end|>",))
register_chat_format("llama-2", llama2_prompt, stop=("</s>",))
register_chat_format("mistral-instruct", mistral_instruct_prompt, stop=("</s>",))


# ---- the sandbox for untrusted Jinja templates -------------------------------------------------

class _TemplateRaised(Exception):
    """The template called raise_exception(message)."""


class _LimitExceeded(Exception):
    """The template went past one of the sandbox's limits."""


class _StepBudget:
    def __init__(self, steps: int, seconds: float):
        self.steps = steps
        self.left = steps
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def spend(self):
        self.left -= 1
        if self.left < 0:
            raise _LimitExceeded(f"it ran more than {self.steps:,} loop iterations and calls")
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"it ran for more than {self.seconds:g} seconds")


# The budget of the render in progress; outside a render (while Jinja folds constants at compile
# time) there is none and nothing is counted.
_budget: contextvars.ContextVar[_StepBudget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _spend_step():
    budget = _budget.get()
    if budget is not None:
        budget.spend()


def _check_size(value):
    """Rejects a str or container larger than a prompt may be; returns the value."""
    size = _size(value, MAX_PROMPT_CHARS)
    if size > MAX_PROMPT_CHARS:
        raise _LimitExceeded(f"it built a value of more than {MAX_PROMPT_CHARS:,} characters or items")
    return value


def _size(value, limit) -> int:
    """Characters plus items in ``value``, counted until ``limit`` is passed."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, Mapping):
        value = [item for pair in value.items() for item in pair]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return 1
    total = len(value)
    for item in value:
        if total > limit:
            break
        total += _size(item, limit - total)
    return total


def _check_numbers(values):
    for value in values:
        if isinstance(value, int) and abs(value) > MAX_NUMBER_ARGUMENT:
            raise _LimitExceeded(
                f"it passed the number {value} to a function; the sandbox allows up to {MAX_NUMBER_ARGUMENT:,}")


def _check_product(operator, left, right):
    """Refuses `*` and `**` whose result would be too large, before computing it."""
    if isinstance(left, int) and isinstance(right, int):
        if operator == "**":
            bits = left.bit_length() * right if right > 0 and abs(left) > 1 else 0
        else:
            bits = left.bit_length() + right.bit_length() if operator == "*" else 0
        if bits > MAX_INTEGER_BITS:
            raise _LimitExceeded(f"it computed an integer of more than {MAX_INTEGER_BITS} bits")
    elif operator == "*":
        count, repeated = (right, left) if isinstance(right, int) else (left, right)
        if isinstance(count, int) and _size(repeated, MAX_PROMPT_CHARS) * count > MAX_PROMPT_CHARS:
            raise _LimitExceeded(f"it repeated a value {count} times, past {MAX_PROMPT_CHARS:,} characters or items")


# printf-style fields (`'%9s' % x`, `|format`) and str.format fields: their widths and precisions.
_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?")
_DIGITS = re.compile(r"\d+")


def _check_printf_widths(fmt, args=()):
    """Refuses `'%999999999s' % x` before it allocates the padding."""
    if isinstance(fmt, str):
        _check_numbers(int(n) for field in _PRINTF_FIELD.finditer(fmt) for n in field.groups() if n)
    _check_numbers(args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,))


def _check_format_widths(fmt: str):
    """Refuses `'{:>999999999}'.format(x)` before it allocates the padding."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:   # malformed: str.format itself will say so
        return
    for _literal, _name, spec, _conversion in fields:
        if spec:
            _check_numbers(int(n) for n in _DIGITS.findall(spec))
            _check_format_widths(spec)   # nested fields: '{:{}}'


def _check_repeat(count, unit):
    """Refuses building `count` copies of `unit` characters past MAX_PROMPT_CHARS, before it is built."""
    if count * unit > MAX_PROMPT_CHARS:
        raise _LimitExceeded(f"it would build {count:,} × {unit:,} characters, past {MAX_PROMPT_CHARS:,}")


def _check_replace(text, old, new, count=-1):
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_repeat(hits, len(new) - len(old))


def _check_join(separator, items):
    if isinstance(separator, str) and isinstance(items, Sized):
        _check_repeat(len(items) - 1, len(separator))


# Filters that can build far more than their arguments hold, checked before they run.
@pass_eval_context
def _join(eval_ctx, value, d="", attribute=None):
    items = list(value)
    _check_join(str(d), items)
    return do_join(eval_ctx, items, d, attribute)


@pass_eval_context
def _replace(eval_ctx, s, old, new, count=None):
    _check_replace(str(s), old, new, -1 if count is None else count)
    return do_replace(eval_ctx, s, old, new, count)


def _indent(s, width=4, first=False, blank=False):
    _check_repeat(str(s).count("\n") + 1, len(width) if isinstance(width, str) else width)
    return do_indent(s, width, first, blank)


def _format(value, *args, **kwargs):
    _check_printf_widths(value, kwargs or args)
    return do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap(environment, s, *args, **kwargs):
    if len(str(s)) > MAX_WORDWRAP_CHARS:   # quadratic in the length of a word
        raise _LimitExceeded(f"it wrapped more than {MAX_WORDWRAP_CHARS:,} characters")
    return do_wordwrap(environment, s, *args, **kwargs)


def _lipsum(n=5, html=True, min=20, max=100):
    _check_numbers((n, min, max))
    if n * max > MAX_LIPSUM_WORDS:
        raise _LimitExceeded(f"lipsum() was asked for more than {MAX_LIPSUM_WORDS:,} words")
    return generate_lorem_ipsum(n, html, min, max)


_CHECKED_FILTERS = {"join": _join, "replace": _replace, "indent": _indent, "format": _format,
                    "wordwrap": _wordwrap}


def _guarded_filter(fn):
    @functools.wraps(fn)  # also copies the pass_context/pass_environment marks Jinja reads
    def guarded(*args, **kwargs):
        _check_numbers(args[1:])
        _check_numbers(kwargs.values())
        _spend_step()
        return _check_size(fn(*args, **kwargs))
    return guarded


@pass_context  # never folded into a constant at compile time: it must run on every render
def _counted_iteration(_context, iterable):
    for item in iterable:
        _spend_step()
        yield item


def _sized_concat(text):
    return _check_size(text)


class _InsertGuards(NodeTransformer):
    """Routes every for-loop's iterable through the step counter and every `~` through the size check."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _filter_call(node.iter, "_counted_iteration")
        return node

    def visit_Concat(self, node):
        return _filter_call(self.generic_visit(node), "_sized_concat")


def _filter_call(expr, filter_name):
    return nodes.Filter(expr, filter_name, [], [], None, None, lineno=expr.lineno)


def _tojson(value, indent=None, separators=None, sort_keys=False, ensure_ascii=False):
    """JSON as Hugging Face's chat templates expect: non-ASCII kept, no HTML escaping. Built piece by
    piece, so deep nesting times a wide indent stops at MAX_PROMPT_CHARS instead of being allocated."""
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise _LimitExceeded(f"it asked for a JSON indent wider than {MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    if indent is None:
        return encoder.encode(value)   # one line, no bigger than the value: the fast C encoder
    pieces, length = [], 0
    for piece in encoder.iterencode(value):
        length += len(piece)
        if length > MAX_PROMPT_CHARS:
            raise _LimitExceeded(f"its JSON passed {MAX_PROMPT_CHARS:,} characters")
        pieces.append(piece)
    return "".join(pieces)


def _raise_exception(message):
    raise _TemplateRaised(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, rendering as Hugging Face does, plus:

    * touching an unsafe attribute (``__class__``, ``__globals__``...) fails at once instead of
      quietly rendering as empty;
    * every loop iteration and call spends one step of a per-render budget;
    * values made by calls, filters, ``+``, ``*``, ``**`` and ``~`` are size-checked, and the
      numbers handed to functions and filters are bounded, so one expression cannot allocate
      gigabytes.
    """

    # "%" too: intercepted operators are never folded into constants at compile time, outside the limits.
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        self.filters.update(_CHECKED_FILTERS, tojson=_tojson)
        self.filters = {name: _guarded_filter(fn) for name, fn in self.filters.items()}
        self.filters["_counted_iteration"] = _counted_iteration
        self.filters["_sized_concat"] = _sized_concat
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, lipsum=_lipsum)

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")

    def call(self, context, obj, /, *args, **kwargs):
        _check_numbers(args)
        _check_numbers(kwargs.values())
        _spend_step()
        if isinstance(getattr(obj, "__self__", None), str):   # a str method
            if obj.__name__ == "replace":
                _check_replace(obj.__self__, *args[:3], **kwargs)
            elif obj.__name__ == "join" and args:
                args = (list(args[0]), *args[1:])
                _check_join(obj.__self__, args[0])
        return _check_size(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _check_product(operator, left, right)
        if operator == "%" and isinstance(left, str):
            _check_printf_widths(left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        """str.format / format_map, as Jinja sandboxes them, with their field widths checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args, **kwargs):
            _check_format_widths(value.__self__)
            return wrapped(*args, **kwargs)
        return checked

    def compile_guarded(self, source: str):
        return self.from_string(_InsertGuards().visit(self.parse(source)))


_SANDBOX = _Sandbox()


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    return _SANDBOX.compile_guarded(source)


class _SandboxedTemplate:
    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str):
        self.origin = origin
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self.template = _compile(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{origin} is not valid Jinja: line {exc.lineno}: {exc.message}") from None
        except Exception as exc:  # the parser on untrusted text: any failure means "invalid template"
            raise ChatTemplateError(f"{origin} could not be compiled: {type(exc).__name__}: {exc}") from exc

    def __call__(self, messages, add_generation_prompt=True, **extra) -> str:
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **extra,
                     "messages": messages, "add_generation_prompt": add_generation_prompt}
        token = _budget.set(_StepBudget(MAX_TEMPLATE_STEPS, MAX_TEMPLATE_SECONDS))
        try:
            return self._render(variables)
        except _TemplateRaised as exc:
            raise ChatTemplateError(f"{self.origin} refused these messages: {exc}") from None
        except SecurityError as exc:
            raise ChatTemplateError(f"{self.origin} tried something the sandbox forbids: {exc}") from None
        except _LimitExceeded as exc:
            raise ChatTemplateError(f"{self.origin} was stopped by the sandbox: {exc}") from None
        except Exception as exc:  # a failing template must never look like a crash of zephyr itself
            raise ChatTemplateError(f"{self.origin} failed while rendering: {type(exc).__name__}: {exc}") from exc
        finally:
            _budget.reset(token)

    def _render(self, variables) -> str:
        chunks, length = [], 0
        for chunk in self.template.generate(variables):
            length += len(chunk)
            if length > MAX_PROMPT_CHARS:
                raise _LimitExceeded(f"its output passed {MAX_PROMPT_CHARS:,} characters")
            chunks.append(chunk)
        return "".join(chunks)


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
    template = _SandboxedTemplate(source, origin or f"chat template {name!r}", bos_token, eos_token)
    if stop is None:
        stop = (eos_token,) if eos_token else ()
    return ChatFormat(name, template, tuple(stop), source)


# ---- choosing a format for a model -------------------------------------------------------------

# general.name words (lowercased, all must appear) -> format, first match wins. For GGUF files
# converted before chat templates were stored, such as Zephyr-7B-beta's from 2023.
_NAME_HINTS = (
    (("zephyr",), "zephyr"),
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
