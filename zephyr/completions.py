"""OpenAI's chat and text completions on a zephyr model, shared by `LLM.create_chat_completion` /
`LLM.create_completion` and the server.

A `ChatCompletion` or `TextCompletion` is one request: made from the request's fields, it checks
them, renders and tokenizes the prompt and merges the settings once (`prompt_tokens`, `settings`,
`stops`), and makes the `n` generations that answer it (`generations()`). Whoever runs the model
feeds it each answer's `Step`s and gets OpenAI's response shapes back: `chunks(step, choice)` when
streaming (after `opening()`), or `add(step, choice)` then `response()`. One answer runs on the
model's single sequence; several are generated together by a `Scheduler` (`requests()`).
"""
import time
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .errors import InvalidRequestError
from .generation import MAX_TOP_LOGPROBS, Generation
from .grammar import grammar_from
from .tools import CallParser, call_grammar, conversation, parse_tool_choice, parse_tools, template_handles_tools

# The most alternatives the legacy completions endpoint reports per token (OpenAI's limit).
MAX_COMPLETION_LOGPROBS = 5


# The most answers one request may ask for (OpenAI's limit is 128; each takes a KV cache sequence).
MAX_CHOICES = 16


def check_n(n) -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}", "n")
    return n


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

    def __init__(self, llm, model, include_usage, fingerprint, n):
        self.ident = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model or Path(llm.model_path).name
        self.fingerprint = fingerprint   # system_fingerprint: the process answering (the server's host:pid)
        self.include_usage = include_usage
        self.n = check_n(n)

    def generations(self, tokenizer) -> list:
        """The n generations answering this request; with a seed, answer i draws from seed + i."""
        seed = self.settings.seed
        return [Generation(tokenizer, self.settings if seed < 0 else replace(self.settings, seed=seed + i),
                           self.prompt_tokens, self.stops) for i in range(self.n)]

    def requests(self, llm, on_event) -> list:
        """Scheduler requests generating the n answers, reporting to on_event(event) with the answer's
        index as `event.choice`: one request sharing the prompt when the model has a sequence for each
        answer, else one per answer, which then reuse the prompt from the cache in turn."""
        from .scheduler import Event, Request
        generations = self.generations(llm.tokenizer)
        if self.n <= llm.model.n_seqs:
            return [Request(self.prompt_tokens, generations, on_event)]

        def numbered(first):
            return lambda event: on_event(Event(event.choice if event.choice is None else first, event.step,
                                                event.error))
        return [Request(self.prompt_tokens, [g], numbered(i)) for i, g in enumerate(generations)]

    def run(self, llm, stream: bool):
        """Generate on `llm`: the response, or an iterator of chunks with `stream`."""
        events = self._steps(llm) if self.n == 1 else self._scheduled(llm)
        if stream:
            return self._chunks(events)
        for choice, step in events:
            self.add(step, choice)
        return self.response()

    def _steps(self, llm):
        for step in llm.steps(self.prompt_tokens, self.settings, self.stops):
            yield 0, step

    def _scheduled(self, llm):
        """(choice, step) of the n answers, generated together on a scheduler in this thread."""
        from .scheduler import Scheduler
        events, ends = [], []
        requests = self.requests(llm, lambda event: (events if event.choice is not None else ends).append(event))
        for _ in Scheduler(llm).drive(requests):
            while events:
                event = events.pop(0)
                yield event.choice, event.step
            for end in ends:
                if end.error is not None:
                    raise end.error
        for event in events:
            yield event.choice, event.step

    def _chunks(self, events):
        yield from self.opening()
        for choice, step in events:
            yield from self.chunks(step, choice)

    def opening(self) -> list:
        """The chunks that open a stream, before any step."""
        return []

    def add(self, step, choice=0):
        """Take a step of answer `choice` of a response that is not streamed."""
        self.chunks(step, choice)

    @property
    def finish_reason(self):
        """The last answer's finish reason, None while any answer runs."""
        reasons = [c.finish_reason for c in self.choices]
        return None if None in reasons else reasons[-1]

    def usage(self) -> dict:
        prompt, generated = len(self.prompt_tokens), sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _count(self, step, choice):
        answer = self.choices[choice]
        if step.token is not None:
            answer.completion_tokens += 1
        if step.finish_reason:
            answer.finish_reason = step.finish_reason
        if self.settings.logprobs is not None:
            answer.pending_logprobs.extend(step.logprobs)
        return answer

    def _chunk(self, index, choice) -> dict:
        body = {"id": self.ident, "object": self.chunk_object, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": [dict(index=index, **choice)]}
        if self.include_usage:
            body["usage"] = None
        return body

    def _closing(self, index, choice) -> list:
        chunks = [self._chunk(index, choice)]
        if self.include_usage and self.finish_reason is not None:   # OpenAI's final usage chunk: no choices
            chunks.append(dict(chunks[0], choices=[], usage=self.usage()))
        return chunks


class _Answer:
    """What one answer (choice) has produced so far."""

    def __init__(self, calls=None):
        self.finish_reason = None
        self.completion_tokens = 0
        self.pending_logprobs = []   # released but not yet sent with a chunk
        self.calls = calls           # a CallParser where tools are offered
        self.text, self.tool_calls, self.logprobs = "", [], []


class ChatCompletion(_Completion):
    id_prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def __init__(self, llm, messages, sampling: dict, *, response_format=None, tools=None, tool_choice=None,
                 parallel_tool_calls=None, logprobs=None, top_logprobs=None, n=None, chat_format=None, model=None,
                 include_usage=False, fingerprint=None):
        """`sampling`: GenerationSettings fields (`grammar` as GBNF text too); the other arguments are
        OpenAI's request fields."""
        super().__init__(llm, model, include_usage, fingerprint, n)
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
        self.choices = [_Answer(CallParser(offered) if offered else None) for _ in range(self.n)]

    @property
    def content(self) -> str:
        """The first answer's text (the whole reply when n = 1)."""
        return self.choices[0].text

    @property
    def tool_calls(self) -> list:
        return self.choices[0].tool_calls

    def opening(self) -> list:
        return [self._chunk(i, {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}) for i in range(self.n)]

    def chunks(self, step, choice=0) -> list:
        """The chunks one step of answer `choice` becomes (and the step taken into the whole response)."""
        answer = self._count(step, choice)
        content, calls = step.text, []
        if answer.calls is not None:
            content, calls = answer.calls.push(step.text)
            if step.finish_reason:
                content += answer.calls.flush()
        chunks = []
        if content:
            chunks.append(self._chunk(choice, {"delta": {"content": content}, "logprobs": self._take_logprobs(answer),
                                               "finish_reason": None}))
            answer.text += content
        for call in calls:
            delta = {"tool_calls": [dict(index=len(answer.tool_calls), **call.as_openai())]}
            chunks.append(self._chunk(choice, {"delta": delta, "logprobs": None, "finish_reason": None}))
            answer.tool_calls.append(call)
        if step.finish_reason:
            chunks += self._closing(choice, {"delta": {}, "logprobs": self._take_logprobs(answer),
                                             "finish_reason": _reason(answer)})
        return chunks

    def reason(self) -> str:
        return _reason(self.choices[0])

    def response(self) -> dict:
        return {"id": self.ident, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [self._choice(i, answer) for i, answer in enumerate(self.choices)],
                "usage": self.usage()}

    def _choice(self, index, answer) -> dict:
        message = {"role": "assistant", "content": answer.text}
        if answer.tool_calls:
            message["content"] = answer.text if answer.text.strip() else None
            message["tool_calls"] = [call.as_openai() for call in answer.tool_calls]
        logprobs = {"content": answer.logprobs} if self.settings.logprobs is not None else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": _reason(answer)}

    def _take_logprobs(self, answer):
        if self.settings.logprobs is None or not answer.pending_logprobs:
            return None
        entries = [_chat_logprob(entry) for entry in answer.pending_logprobs]
        answer.pending_logprobs = []
        answer.logprobs += entries
        return {"content": entries}


def _reason(answer) -> str:
    return "tool_calls" if answer.tool_calls and answer.finish_reason == "stop" else answer.finish_reason


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
        super().__init__(llm, model, include_usage, fingerprint, n)
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
        self.choices = [_Answer() for _ in range(self.n)]
        for answer in self.choices:
            answer.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    @property
    def text(self) -> str:
        """The first answer's text (the whole completion when n = 1)."""
        return self.choices[0].text

    def chunks(self, step, choice=0) -> list:
        answer = self._count(step, choice)
        chunks = []
        if step.text:
            chunks.append(self._chunk(choice, {"text": step.text, "logprobs": self._take_logprobs(answer),
                                               "finish_reason": None}))
            answer.text += step.text
        if step.finish_reason:
            chunks += self._closing(choice, {"text": "", "logprobs": self._take_logprobs(answer),
                                             "finish_reason": step.finish_reason})
        return chunks

    def response(self) -> dict:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint,
                "choices": [{"index": i, "text": answer.text,
                             "logprobs": answer.logprobs if self.settings.logprobs is not None else None,
                             "finish_reason": answer.finish_reason} for i, answer in enumerate(self.choices)],
                "usage": self.usage()}

    def _take_logprobs(self, answer):
        if self.settings.logprobs is None or not answer.pending_logprobs:
            return None
        sent = answer.logprobs
        offset = (sent["text_offset"][-1] + len(sent["tokens"][-1])) if sent["tokens"] else 0
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in answer.pending_logprobs:
            part["tokens"].append(entry.text)
            part["token_logprobs"].append(entry.logprob)
            top = {text: logprob for _, text, _, logprob in entry.top}
            top.setdefault(entry.text, entry.logprob)   # OpenAI: the sampled token is always among them
            part["top_logprobs"].append(top)
            part["text_offset"].append(offset)
            offset += len(entry.text)
        answer.pending_logprobs = []
        for key, values in part.items():
            sent[key] += values
        return part
