"""LangChain models backed by zephyr (`pip install 'zephyr[langchain]'`).

    from zephyr.integrations.langchain import ChatZephyr, Zephyr
    chat = ChatZephyr(model="TheBloke/zephyr-7B-beta-GGUF", model_file="zephyr-7b-beta.Q4_K_M.gguf", gpu_layers=0)
    chat.invoke("What is the capital of France?")
    for chunk in Zephyr(model="demo").stream("Once upon a time"):
        print(chunk, end="")

`model` is anything `AutoModelForCausalLM.from_pretrained` takes: a .gguf path, a directory, a Hugging
Face repo id (with `model_file`), or "demo". Pass `client=` an already loaded `zephyr.LLM` to share
one model between several LangChain objects; calls on one model run one at a time. Generation
settings left unset come from the model's Config (`config={...}` when loading here).

    chat.bind_tools([get_weather]).invoke("Weather in Paris?").tool_calls
    chat.with_structured_output(Person).invoke("Describe a person")     # a Person
"""
import json
from operator import itemgetter
from typing import Any, Iterator, Optional

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                         SystemMessage, ToolMessage)
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from langchain_core.runnables import RunnableMap, RunnablePassthrough
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import BaseModel, ConfigDict, Field, model_validator
except ImportError as exc:
    raise ImportError(f"zephyr.integrations.langchain needs langchain-core ({exc.name} is missing): "
                      f"pip install 'zephyr[langchain]'") from exc

from ..completions import ChatCompletion
from ..config import Config
from ..generation import GenerationSettings

# Fields that say how to load the model: they cannot apply to a `client` that is already loaded.
LOAD_FIELDS = ("model", "model_file", "gpu_layers", "context_length", "threads", "backend", "config", "load_options")
# Fields that say how to generate; unset (None), the loaded model's Config decides.
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
# What ChatZephyr passes through to the chat completion besides generation settings.
CHAT_OPTIONS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


class _ZephyrSettings(BaseModel):
    """What both LangChain classes take: where the model comes from, how to load it, how to sample."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    model: Optional[str] = None
    """A .gguf path, a directory, a Hugging Face repo id, or "demo"."""
    model_file: Optional[str] = None
    gpu_layers: Optional[int] = None
    context_length: Optional[int] = None
    threads: Optional[int] = None
    backend: Optional[str] = None
    config: Optional[dict] = None
    """`Config` fields, as LangChain's CTransformers class takes them: how to load, and the default settings."""
    load_options: dict = Field(default_factory=dict)
    """Further keyword arguments for `from_pretrained` (revision, local_files_only, ...)."""
    chat_format: Optional[str] = None

    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[list[str]] = None

    client: Any = Field(default=None, exclude=True)
    """The loaded zephyr.LLM (loaded from `model` when not given)."""

    @model_validator(mode="after")
    def _load(self):
        if self.client is not None:
            given = [name for name in LOAD_FIELDS if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} say how to load a model, but client= is already loaded; "
                                 f"set them when loading the client")
            return self
        if not self.model:
            raise ValueError("pass model= (a .gguf path, a directory, a Hugging Face repo id, or 'demo') "
                             "or client= (a loaded zephyr.LLM)")
        config = Config().updated(**(self.config or {}))
        loading = {name: getattr(self, name) for name in ("gpu_layers", "context_length", "threads")
                   if getattr(self, name) is not None}
        from ..llm import AutoModelForCausalLM
        self.client = AutoModelForCausalLM.from_pretrained(
            self.model, model_file=self.model_file, backend=self.backend, chat_format=self.chat_format,
            config=config, **loading, **self.load_options)
        return self

    @property
    def _identifying_params(self) -> dict:
        return {"model": self.model or self.client.model_path, "model_file": self.model_file,
                **self._settings(None, {})}

    def _settings(self, stop, overrides) -> dict:
        """Generation settings of one call: the fields that are set, the call's stop strings and its
        keyword overrides (GenerationSettings names; anything else is a TypeError)."""
        unknown = set(overrides) - set(GenerationSettings.names())
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(GenerationSettings.names())}")
        settings = {name: getattr(self, name) for name in GENERATION_FIELDS if getattr(self, name) is not None}
        stops = list(self.stop or []) + list(stop or [])
        if stops:
            settings["stop"] = stops
        settings.update(overrides)
        return settings


class Zephyr(_ZephyrSettings, LLM):
    """A zephyr model as a LangChain text-completion LLM."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "zephyr"

    def _call(self, prompt: str, stop: Optional[list[str]] = None,
              run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> str:
        return self.client(prompt, **self._settings(stop, kwargs), stream=False)

    def _stream(self, prompt: str, stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for text in self.client(prompt, **self._settings(stop, kwargs), stream=True):
            if not text:
                continue
            chunk = GenerationChunk(text=text)
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk


ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool"}


def to_zephyr_messages(messages: list) -> list:
    """LangChain messages as OpenAI-style messages: {"role", "content"}, with the AI's tool calls
    and the tool results' call ids."""
    converted = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else next(
            (name for cls, name in ROLES.items() if isinstance(message, cls)), None)
        if role is None:
            raise ValueError(f"ChatZephyr cannot send a {type(message).__name__}; "
                             f"use system, human, AI, tool or chat messages")
        entry = {"role": role, "content": message.text if hasattr(message, "text") else message.content}
        if isinstance(message, AIMessage) and message.tool_calls:
            entry["tool_calls"] = [{"id": call["id"], "type": "function",
                                    "function": {"name": call["name"], "arguments": json.dumps(call["args"])}}
                                   for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        converted.append(entry)
    return converted


class ChatZephyr(_ZephyrSettings, BaseChatModel):
    """A zephyr model as a LangChain chat model (prompts built with the model's chat template), with
    tools (`bind_tools`) and structured output (`with_structured_output`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=(), extra="forbid")

    @property
    def _llm_type(self) -> str:
        return "zephyr-chat"

    def _completion(self, messages, stop, kwargs) -> ChatCompletion:
        options = {name: kwargs.pop(name) for name in CHAT_OPTIONS if name in kwargs}
        return ChatCompletion(self.client, to_zephyr_messages(messages), self._settings(stop, kwargs),
                              chat_format=self.chat_format, **options)

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        reply = self._completion(messages, stop, kwargs).run(self.client, stream=False)
        choice = reply["choices"][0]
        calls = [{"name": call["function"]["name"], "args": json.loads(call["function"]["arguments"]),
                  "id": call["id"], "type": "tool_call"} for call in choice["message"].get("tool_calls", [])]
        message = AIMessage(content=choice["message"]["content"] or "", tool_calls=calls,
                            response_metadata={"finish_reason": choice["finish_reason"]},
                            usage_metadata={"input_tokens": reply["usage"]["prompt_tokens"],
                                            "output_tokens": reply["usage"]["completion_tokens"],
                                            "total_tokens": reply["usage"]["total_tokens"]})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for reply in self._completion(messages, stop, kwargs).run(self.client, stream=True):
            choice = reply["choices"][0]
            delta, finish = choice["delta"], choice["finish_reason"]
            calls = [{"name": call["function"]["name"], "args": call["function"]["arguments"], "id": call["id"],
                      "index": call["index"]} for call in delta.get("tool_calls", [])]
            text = delta.get("content") or ""
            if not text and not calls and not finish:
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(
                content=text, tool_call_chunks=calls,
                response_metadata={"finish_reason": finish} if finish else {}))
            if run_manager and text:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk

    def bind_tools(self, tools, *, tool_choice=None, parallel_tool_calls=None, **kwargs):
        """Offer `tools` (dicts, pydantic models, functions or LangChain tools) to the model. tool_choice:
        "auto", "none", "required" (or "any"), or a tool's name."""
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice == "any":
            tool_choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "required"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        options = {"tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls}
        return self.bind(tools=formatted, **{k: v for k, v in options.items() if v is not None}, **kwargs)

    def with_structured_output(self, schema, *, method="json_schema", include_raw=False, **kwargs):
        """Replies parsed into `schema` (a pydantic model, a TypedDict, or a JSON schema / OpenAI tool
        dict). method "json_schema" (default) constrains the reply to the schema's JSON, "json_mode"
        to any JSON object, "function_calling" makes the model call a tool with the schema as arguments."""
        if kwargs:
            raise TypeError(f"unexpected argument(s) {', '.join(sorted(kwargs))}")
        pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        function = convert_to_openai_tool(schema)["function"] if method != "json_mode" else None
        if method == "function_calling":
            llm = self.bind_tools([schema], tool_choice=function["name"], parallel_tool_calls=False)
            parser = PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic else \
                JsonOutputKeyToolsParser(key_name=function["name"], first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            response_format = {"type": "json_object"} if method == "json_mode" else {
                "type": "json_schema", "json_schema": {"name": function["name"], "schema": function["parameters"]}}
            llm = self.bind(response_format=response_format)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        else:
            raise ValueError(f"method must be 'json_schema', 'json_mode' or 'function_calling', got {method!r}")
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        failed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([failed], exception_key="parsing_error")
