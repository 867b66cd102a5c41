"""The sandbox that renders untrusted Jinja templates (chat templates inside model files).

A template from a GGUF file is code written by whoever made the file (llama-cpp-python's
CVE-2024-34359 ran shell commands from one). It runs here in Jinja's immutable sandbox (no dunder
attributes, no mutation of lists or dicts), with limits on the work and the size of one render:

* every loop iteration and call spends one step of a per-render budget (MAX_TEMPLATE_STEPS), and a
  render stops after MAX_TEMPLATE_SECONDS;
* values made by calls, filters, ``+``, ``*``, ``**``, ``%`` and ``~`` are size-checked against
  MAX_PROMPT_CHARS, and the numbers handed to functions and filters are bounded, so one expression
  cannot allocate gigabytes; operations whose result can dwarf their inputs are checked first.

``compile_template`` and ``render`` are the whole interface; every failure becomes a
``ChatTemplateError`` naming where the template came from. zephyr.chat builds prompts with them.
"""
import contextvars
import functools
import json
import re
import string
import time
from datetime import datetime
from typing import Iterable, Mapping, Sized

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
    """JSON as Hugging Face's chat templates expect: non-ASCII kept, no HTML escaping; iterators such
    as `tools|map(attribute='function')` become arrays, as in llama.cpp. Built piece by piece, so deep
    nesting times a wide indent stops at MAX_PROMPT_CHARS instead of being allocated."""
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise _LimitExceeded(f"it asked for a JSON indent wider than {MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii,
                               default=_json_container)
    if indent is None:
        return encoder.encode(value)   # one line, no bigger than the value: the fast C encoder
    pieces, length = [], 0
    for piece in encoder.iterencode(value):
        length += len(piece)
        if length > MAX_PROMPT_CHARS:
            raise _LimitExceeded(f"its JSON passed {MAX_PROMPT_CHARS:,} characters")
        pieces.append(piece)
    return "".join(pieces)


def _json_container(value):
    """A list or dict for the iterables and mappings the json module has no type for (map, select, ...)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        items = []
        for item in value:
            items.append(item)
            if len(items) > MAX_PROMPT_CHARS:
                raise _LimitExceeded(f"it turned more than {MAX_PROMPT_CHARS:,} items into JSON")
        return items
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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


def compile_template(source: str, origin: str):
    """The sandboxed template of ``source``, compiled once per source. ``origin`` names it in errors."""
    try:
        return _compile(source)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{origin} is not valid Jinja: line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # the parser on untrusted text: any failure means "invalid template"
        raise ChatTemplateError(f"{origin} could not be compiled: {type(exc).__name__}: {exc}") from exc


def render(template, variables: Mapping, origin: str) -> str:
    """The output of a template from ``compile_template`` given ``variables``, within the limits."""
    token = _budget.set(_StepBudget(MAX_TEMPLATE_STEPS, MAX_TEMPLATE_SECONDS))
    try:
        return _generate(template, variables)
    except _TemplateRaised as exc:
        raise ChatTemplateError(f"{origin} refused these messages: {exc}") from None
    except SecurityError as exc:
        raise ChatTemplateError(f"{origin} tried something the sandbox forbids: {exc}") from None
    except _LimitExceeded as exc:
        raise ChatTemplateError(f"{origin} was stopped by the sandbox: {exc}") from None
    except Exception as exc:  # a failing template must never look like a crash of zephyr itself
        raise ChatTemplateError(f"{origin} failed while rendering: {type(exc).__name__}: {exc}") from exc
    finally:
        _budget.reset(token)


def _generate(template, variables) -> str:
    chunks, length = [], 0
    for chunk in template.generate(variables):
        length += len(chunk)
        if length > MAX_PROMPT_CHARS:
            raise _LimitExceeded(f"its output passed {MAX_PROMPT_CHARS:,} characters")
        chunks.append(chunk)
    return "".join(chunks)
