"""From a validated request to generated pieces, and from pieces to OpenAI's response shapes.

Everything here that touches the model runs on the model's worker thread (see runner.py); the
response builders are pure functions of what the generation reported.
"""
import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import numpy as np

from ..errors import ContextOverflowError

# Defaults for sampling fields a request leaves out: OpenAI's temperature and top_p, llama.cpp
# server's top_k and min_p, and no repetition penalty (OpenAI has none).
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
# OpenAI's legacy completions endpoint generates 16 tokens unless told otherwise; chat runs until
# the model stops or the context is full.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass
class Started:
    """The prompt is tokenized and fits: generation is about to begin."""
    prompt_tokens: int


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    reason: str                 # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


Event = Union[Started, Piece, Finished]


@dataclass
class Job:
    """One generation request, ready to run: the prompt, the sampling settings, the stop strings."""
    kind: str                   # "chat" or "completion"
    request: object
    prompt: Union[str, list, None] = None
    messages: Optional[list] = None
    ident: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def sampling_settings(request, default_max_tokens) -> dict:
    """The request's sampling fields as LLM.completion_stream keyword arguments, the OpenAI server's
    defaults filled in."""
    get = lambda name: DEFAULTS[name] if getattr(request, name) is None else getattr(request, name)  # noqa: E731
    return dict(temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"), min_p=get("min_p"),
                repetition_penalty=get("repeat_penalty"), stop=request.stop, seed=request.seed,
                max_new_tokens=request.token_limit or default_max_tokens)


def run(llm, job: Job) -> Iterator[Event]:
    """Generate for `job` (on the worker thread): Started, then Pieces, then Finished.
    Closing the iterator stops the generation and frees the model."""
    if job.kind == "chat":
        tokens, formatter = llm.chat_prompt(job.messages)
        extra_stops, default_max = formatter.stop, -1
    else:
        tokens = llm.tokenize_prompt(job.prompt) if isinstance(job.prompt, str) else list(job.prompt)
        extra_stops, default_max = (), COMPLETION_DEFAULT_MAX_TOKENS
        bad = [t for t in tokens if not 0 <= t < llm.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {llm.vocab_size}); got {bad[0]}")
    if len(tokens) >= llm.context_length:
        raise ContextOverflowError(
            f"the prompt has {len(tokens)} tokens, but this model's context holds {llm.context_length}; "
            f"shorten the {'messages' if job.kind == 'chat' else 'prompt'} (or restart the server with a larger "
            f"--context-length)")
    settings = sampling_settings(job.request, default_max)
    yield Started(len(tokens))
    generated = 0

    def count(_token):
        nonlocal generated
        generated += 1

    pieces = llm.completion_stream(tokens, extra_stops=extra_stops, on_token=count, **settings)
    try:
        for text, finish in pieces:
            if text:
                yield Piece(text)
            if finish:
                yield Finished(finish, len(tokens), generated)
    finally:
        pieces.close()


def embed(llm, request, model: str) -> dict:
    """The embeddings response for `request` (on the worker thread)."""
    data, used = [], 0
    for index, item in enumerate(request.inputs()):
        tokens = llm.tokenize_prompt(item) if isinstance(item, str) else list(item)
        used += len(tokens)
        vector = llm.embed(tokens)
        if request.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": used, "total_tokens": used}}


# -- OpenAI response shapes ----------------------------------------------------------------------
def completion_response(job: Job, model: str, fingerprint: str, text: str, finished: Finished) -> dict:
    """The whole (non-streamed) response; `fingerprint` names the server process (system_fingerprint)."""
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finished.reason}
        return {"id": f"chatcmpl-{job.ident}", "object": "chat.completion", "created": job.created, "model": model,
                "system_fingerprint": fingerprint, "choices": [choice], "usage": finished.usage()}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finished.reason}
    return {"id": f"cmpl-{job.ident}", "object": "text_completion", "created": job.created, "model": model,
            "system_fingerprint": fingerprint, "choices": [choice], "usage": finished.usage()}


def stream_chunks(job: Job, model: str, fingerprint: str, event: Event) -> list:
    """The chunk dicts one event becomes when streaming (Started opens a chat with the role)."""
    chat = job.kind == "chat"
    include_usage = job.request.include_usage

    def chunk(delta_or_text, finish=None):
        if chat:
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            body = {"id": f"chatcmpl-{job.ident}", "object": "chat.completion.chunk", "created": job.created,
                    "model": model, "system_fingerprint": fingerprint, "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            body = {"id": f"cmpl-{job.ident}", "object": "text_completion", "created": job.created,
                    "model": model, "system_fingerprint": fingerprint, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    if isinstance(event, Started):
        return [chunk({"role": "assistant", "content": ""})] if chat else []
    if isinstance(event, Piece):
        return [chunk({"content": event.text} if chat else event.text)]
    chunks = [chunk({} if chat else "", event.reason)]
    if include_usage:   # OpenAI's final usage chunk: no choices
        last = dict(chunks[0], choices=[], usage=event.usage())
        chunks.append(last)
    return chunks
