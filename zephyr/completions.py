"""OpenAI's chat and text completions on a zephyr model, shared by `LLM.create_chat_completion` /
`LLM.create_completion` and the server.

A `ChatCompletion` or `TextCompletion` is one request: made from the request's fields, it checks
them, renders and tokenizes the prompt and merges the settings once (`prompt_tokens`, `settings`,
`stops`). Whoever runs the model feeds it the generation's `Step`s and gets OpenAI's response
shapes back: `chunks(step)` when streaming (after `opening()`), or `add(step)` then `response()`.
"""
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidRequestError
from .generation import MAX_TOP_LOGPROBS
from .grammar import grammar_from
from .tools import CallParser, call_grammar, conversation, parse_tool_choice, parse_tools, template_handles_tools

# The most alternatives the legacy completions endpoint reports per token (OpenAI's limit).
MAX_COMPLETION_LOGPROBS = 5


def check_n(n):
    if n is not None and n != 1:
        raise InvalidRequestError(f"n={n}: only one choice per request is supported (n=1)", "n")


@contextmanager
def field(param):
    """A ValueError raised while checking the request field `param` becomes an InvalidRequestError naming it."""
    try:
        yield
    except InvalidRequestError:
        raise
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param) from None


class _Completion:
    id_prefix = chunk_object = ""   # set by each kind

    def __init__(self, llm, model, include_usage, fingerprint):
        self.ident = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model or Path(llm.model_path).name
        self.fingerprint = fingerprint   # system_fingerprint: the process answering (the server's host:pid)
        self.include_usage = include_usage
        self.finish_reason = None
        self.completion_tokens = 0
        self._logprobs = []     # released but not yet sent with a chunk

    def run(self, llm, stream: bool):
        """Generate on `llm` (one sequence): the response, or an iterator of chunks with `stream`."""
        steps = llm.steps(self.prompt_tokens, self.settings, self.stops)
        if stream:
            return self._chunks(steps)
        for step in steps:
            self.add(step)
        return self.response()

    def _chunks(self, steps):
        yield from self.opening()
        for step in steps:
            yield from self.chunks(step)

    def opening(self) -> list:
        """The chunks that open a stream, before any step."""
        return []

    def add(self, step):
        """Take a step of a response that is not streamed."""
        self.chunks(step)

    def usage(self) -> dict:
        prompt = len(self.prompt_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    def _count(self, step):
        if step.token is not None:
            self.completion_tokens += 1
        if step.finish_reason:
            self.finish_reason = step.finish_reason
        if self.settings.logprobs is not None:
            self._logprobs.extend(step.logprobs)

    def _chunk(self, choice) -> dict:
        body = {"id": self.ident, "object": self.chunk_object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [dict(index=0, **choice)]}
        if self.include_usage:
            body["usage"] = None
        return body

    def _closing(self, choice) -> list:
        chunks = [self._chunk(choice)]
        if self.include_usage:   # OpenAI's final usage chunk: no choices
            chunks.append(dict(chunks[0], choices=[], usage=self.usage()))
        return chunks


class ChatCompletion(_Completion):
    id_prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, llm, messages, sampling: dict, *, response_format=None, tools=None, tool_choice=None,
                 parallel_tool_calls=None, logprobs=None, top_logprobs=None, n=None, chat_format=None, model=None,
                 include_usage=False, fingerprint=None):
        """`sampling`: GenerationSettings fields (`grammar` as GBNF text too); the other arguments are
        OpenAI's request fields."""
        super().__init__(llm, model, include_usage, fingerprint)
        check_n(n)
        with field("top_logprobs"):
            if top_logprobs is not None and not logprobs:
                raise ValueError("top_logprobs needs logprobs=true")
            if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or
                                             not 0 <= top_logprobs <= MAX_TOP_LOGPROBS):
                raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top_logprobs!r}")
        with field("parallel_tool_calls"):
            if parallel_tool_calls is not None and not tools:
                raise ValueError("parallel_tool_calls needs tools")
        with field("tools"):
            tools = parse_tools(tools)
        with field("tool_choice"):
            choice = parse_tool_choice(tool_choice, tools)
        offered = tools if choice.mode != "none" else ()
        formatter = llm.chat_format(chat_format)
        native = bool(offered) and template_handles_tools(formatter)
        variables = {"tools": [t.as_openai() for t in offered]} if native else {}
        with field("messages"):
            messages = conversation(messages, offered, native)
        text = formatter.render(messages, add_generation_prompt=True, **variables)
        self.prompt_tokens = llm.tokenize_chat(text)
        llm.check_prompt(self.prompt_tokens)
        grammar = _grammar(sampling, response_format)
        if offered:
            with field("tools"):
                if grammar is not None:
                    raise ValueError("tools cannot be combined with grammar or a JSON response_format; "
                                     "pass tool_choice='none' to answer in the format without calling tools")
                grammar = call_grammar(offered, choice, parallel_tool_calls is not False)
        self.settings = _settings(llm, sampling, grammar, (top_logprobs or 0) if logprobs else None)
        self.stops = formatter.stop
        self._calls = CallParser(offered) if offered else None
        self.content, self.tool_calls, self.logprobs = "", [], []

    def opening(self) -> list:
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})]

    def chunks(self, step) -> list:
        """The chunks one step becomes (and the step taken into the whole response)."""
        self._count(step)
        content, calls = step.text, []
        if self._calls is not None:
            content, calls = self._calls.push(step.text)
            if step.finish_reason:
                content += self._calls.flush()
        chunks = []
        if content:
            chunks.append(self._chunk({"delta": {"content": content}, "logprobs": self._take_logprobs(),
                                       "finish_reason": None}))
            self.content += content
        for call in calls:
            delta = {"tool_calls": [dict(index=len(self.tool_calls), **call.as_openai())]}
            chunks.append(self._chunk({"delta": delta, "logprobs": None, "finish_reason": None}))
            self.tool_calls.append(call)
        if step.finish_reason:
            chunks += self._closing({"delta": {}, "logprobs": self._take_logprobs(),
                                     "finish_reason": self.reason()})
        return chunks

    def reason(self) -> str:
        return "tool_calls" if self.tool_calls and self.finish_reason == "stop" else self.finish_reason

    def response(self) -> dict:
        message = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["content"] = self.content if self.content.strip() else None
            message["tool_calls"] = [call.as_openai() for call in self.tool_calls]
        logprobs = {"content": self.logprobs} if self.settings.logprobs is not None else None
        return {"id": self.ident, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": self.reason()}],
                "usage": self.usage()}

    def _take_logprobs(self):
        if self.settings.logprobs is None or not self._logprobs:
            return None
        entries = [_chat_logprob(entry) for entry in self._logprobs]
        self._logprobs = []
        self.logprobs += entries
        return {"content": entries}


def _grammar(sampling, response_format):
    """The grammar of the `grammar` setting (GBNF text or a Grammar) or of a JSON response_format."""
    param = "grammar" if sampling.get("grammar") is not None else "response_format"
    with field(param):
        return grammar_from(sampling.pop("grammar", None), response_format)


def _settings(llm, sampling, grammar, logprobs):
    """The request's settings, merged once with the model's config; a bad value names its field."""
    for name in ("logit_bias", "presence_penalty", "frequency_penalty", "stop", "temperature", "top_p"):
        with field(name):
            llm.settings(**{name: sampling.get(name)}).sampling(llm.vocab_size)
    return llm.settings(**sampling, grammar=grammar, logprobs=logprobs)


def _chat_logprob(entry) -> dict:
    return {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.bytes),
            "top_logprobs": [{"token": text, "logprob": logprob, "bytes": list(data)}
                             for _, text, data, logprob in entry.top]}


class TextCompletion(_Completion):
    id_prefix, chunk_object = "cmpl", "text_completion"

    def __init__(self, llm, prompt, sampling: dict, *, response_format=None, logprobs=None, n=None, model=None,
                 include_usage=False, fingerprint=None):
        """`prompt`: text or token ids; `sampling`: GenerationSettings fields (`grammar` as GBNF text
        too); `logprobs`: how many alternatives to report per token (0-5), None for none."""
        super().__init__(llm, model, include_usage, fingerprint)
        check_n(n)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or
                                     not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS):
            raise InvalidRequestError(f"logprobs must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}, "
                                      f"got {logprobs!r}", "logprobs")
        if isinstance(prompt, str):
            self.prompt_tokens = llm.tokenize_prompt(prompt)
        else:
            self.prompt_tokens = [int(t) for t in prompt]
            bad = [t for t in self.prompt_tokens if not 0 <= t < llm.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be in [0, {llm.vocab_size}); got {bad[0]}", "prompt")
        if not self.prompt_tokens:
            raise InvalidRequestError("the prompt is empty", "prompt")
        llm.check_prompt(self.prompt_tokens)
        self.settings = _settings(llm, sampling, _grammar(sampling, response_format), logprobs)
        self.stops = ()
        self.text, self.logprobs = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def chunks(self, step) -> list:
        self._count(step)
        chunks = []
        if step.text:
            chunks.append(self._chunk({"text": step.text, "logprobs": self._take_logprobs(), "finish_reason": None}))
            self.text += step.text
        if step.finish_reason:
            chunks += self._closing({"text": "", "logprobs": self._take_logprobs(),
                                     "finish_reason": step.finish_reason})
        return chunks

    def response(self) -> dict:
        logprobs = self.logprobs if self.settings.logprobs is not None else None
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": 0, "text": self.text, "logprobs": logprobs, "finish_reason": self.finish_reason}],
                "usage": self.usage()}

    def _take_logprobs(self):
        if self.settings.logprobs is None or not self._logprobs:
            return None
        offset = (self.logprobs["text_offset"][-1] + len(self.logprobs["tokens"][-1])) if self.logprobs["tokens"] \
            else 0
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in self._logprobs:
            part["tokens"].append(entry.text)
            part["token_logprobs"].append(entry.logprob)
            top = {text: logprob for _, text, _, logprob in entry.top}
            top.setdefault(entry.text, entry.logprob)   # OpenAI: the sampled token is always among them
            part["top_logprobs"].append(top)
            part["text_offset"].append(offset)
            offset += len(entry.text)
        self._logprobs = []
        for key, values in part.items():
            self.logprobs[key] += values
        return part
