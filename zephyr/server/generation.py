"""From a validated request to a running generation (on the model's worker thread).

The request becomes the shared `zephyr.completions` object (prompt, settings merged once, response
shapes) with the OpenAI server's defaults; the model's steps then stream back to the event loop,
which turns them into chunks or the whole response through that same object.
"""
import base64
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np

from ..completions import ChatCompletion, TextCompletion
from ..generation import Step

# Defaults for sampling fields a request leaves out: OpenAI's temperature and top_p, llama.cpp
# server's top_k and min_p, and no repetition penalty (OpenAI has none).
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0}
# OpenAI's legacy completions endpoint generates 16 tokens unless told otherwise; chat runs until
# the model stops or the context is full.
COMPLETION_DEFAULT_MAX_TOKENS = 16


@dataclass
class Started:
    """The prompt is tokenized and fits, the fields are valid: generation is about to begin."""
    completion: Union[ChatCompletion, TextCompletion]


Event = Union[Started, Step]


def sampling_settings(request, default_max_tokens) -> dict:
    """The request's sampling fields as GenerationSettings fields, the OpenAI server's defaults filled in."""
    get = lambda name: DEFAULTS[name] if getattr(request, name) is None else getattr(request, name)  # noqa: E731
    return dict(temperature=get("temperature"), top_p=get("top_p"), top_k=get("top_k"), min_p=get("min_p"),
                repetition_penalty=get("repeat_penalty"), presence_penalty=get("presence_penalty"),
                frequency_penalty=get("frequency_penalty"), logit_bias=request.logit_bias, stop=request.stop,
                seed=request.seed, grammar=request.grammar, max_new_tokens=request.token_limit or default_max_tokens)


def completion(llm, kind: str, request, model: str, fingerprint: str = None):
    """The shared completion object of a chat or completions request; `fingerprint` names the
    server process (system_fingerprint)."""
    if kind == "chat":
        return ChatCompletion(
            llm, request.conversation(), sampling_settings(request, -1), response_format=request.response_format,
            tools=request.tools, tool_choice=request.tool_choice, parallel_tool_calls=request.parallel_tool_calls,
            logprobs=request.logprobs, top_logprobs=request.top_logprobs, n=request.n, model=model,
            include_usage=request.include_usage, fingerprint=fingerprint)
    return TextCompletion(llm, request.prompt, sampling_settings(request, COMPLETION_DEFAULT_MAX_TOKENS),
                          response_format=request.response_format, logprobs=request.logprobs, n=request.n,
                          model=model, include_usage=request.include_usage, fingerprint=fingerprint)


def run(llm, kind: str, request, model: str, fingerprint: str) -> Iterator[Event]:
    """Generate for `request` (on the worker thread): Started, then the generation's Steps.
    Closing the iterator stops the generation and frees the model."""
    job = completion(llm, kind, request, model, fingerprint)
    yield Started(job)
    yield from llm.steps(job.prompt_tokens, job.settings, job.stops)


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
