"""From a validated request to what the scheduler runs (on a preparing thread, runner.py).

The request becomes the shared `zephyr.completions` object (prompt, settings merged once, response
shapes) with the OpenAI server's defaults; its answers' steps then stream back to the event loop,
which turns them into chunks or the whole response through that same object.
"""
import base64
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..completions import ChatCompletion, TextCompletion

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


def prepare(llm, kind: str, request, model: str, fingerprint: str):
    """(Started, completion) for `request`: its prompt rendered and tokenized, its fields checked."""
    job = completion(llm, kind, request, model, fingerprint)
    return Started(job), job


def embedding_inputs(llm, request) -> list:
    """The token ids of each input of an embeddings request."""
    return [llm.tokenize_prompt(item) if isinstance(item, str) else list(item) for item in request.inputs()]


def embedding_response(request, inputs, vectors, model: str) -> dict:
    """The embeddings response: one vector per input (base64 little-endian float32 on request)."""
    data = []
    for index, vector in enumerate(vectors):
        if request.encoding_format == "base64":
            vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    used = sum(len(tokens) for tokens in inputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": used, "total_tokens": used}}
