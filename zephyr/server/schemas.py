"""Request bodies of the OpenAI-compatible API, as pydantic models (responses are plain dicts).

Fields zephyr does not know are ignored, as OpenAI-compatible clients send many optional ones; fields
it knows but cannot honour (n > 1, echo, ...) are refused with a 400 naming them. The meaning of the
fields it honours is checked by `zephyr.completions` (shared with the Python API), whose ValueErrors
become 400s too. Sampling fields left out (or null) get their defaults in `generation.sampling_settings`.
"""
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: Optional[str] = None             # any name is accepted: the server runs one model
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict] = None
    # Extensions that llama.cpp-based servers accept too.
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, gt=0)
    grammar: Optional[str] = None          # GBNF

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str = "{}"


class ToolCall(_Request):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: Optional[list[ToolCall]] = None     # an assistant's earlier calls
    tool_call_id: Optional[str] = None              # the call a tool message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Union[str, dict]] = None

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value):
        if value:
            raise ValueError("the legacy function calling fields are not supported; use tools and tool_choice")
        return value

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list:
        """The messages as zephyr's chat templates take them ('developer' is OpenAI's newer 'system')."""
        messages = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role,
                       "content": None if m.content is None and m.tool_calls else m.text()}
            if m.tool_calls:
                message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        return messages


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value, info):
        if value:
            raise ValueError(f"{info.field_name} is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of):
        if best_of is not None and best_of != 1:
            raise ValueError("only best_of=1 is supported")
        return best_of

    @property
    def token_limit(self) -> Optional[int]:
        return self.max_tokens


# Each input is a full model evaluation: bound the work one request can queue.
MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(_Request):
    model: Optional[str] = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None

    @field_validator("dimensions")
    @classmethod
    def _full_size(cls, dimensions):
        if dimensions is not None:
            raise ValueError("is not supported: embeddings have the model's hidden size")
        return dimensions

    @model_validator(mode="after")
    def _not_empty(self):
        if not self.input or (isinstance(self.input, list) and not all(self.input)):
            raise ValueError("input must not be empty")
        if isinstance(self.input, list) and not isinstance(self.input[0], int) and len(self.input) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return self

    def inputs(self) -> list:
        """The inputs as a list of texts or token lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]
        return list(self.input)
