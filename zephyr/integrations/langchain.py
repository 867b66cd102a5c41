"""LangChain models backed by zephyr (`pip install 'zephyr[langchain]'`).

    from zephyr.integrations.langchain import ChatZephyr, Zephyr
    chat = ChatZephyr(model="TheBloke/zephyr-7B-beta-GGUF", model_file="zephyr-7b-beta.Q4_K_M.gguf", gpu_layers=0)
    chat.invoke("What is the capital of France?")
    for chunk in Zephyr(model="demo").stream("Once upon a time"):
        print(chunk, end="")

`model` is anything `AutoModelForCausalLM.from_pretrained` takes: a .gguf path, a directory, a Hugging
Face repo id (with `model_file`), or "demo". Pass `client=` an already loaded `zephyr.LLM` to share
one model between several LangChain objects; calls on one model run one at a time.
"""
from typing import Any, Iterator, Optional

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel
    from langchain_core.language_models.llms import LLM
    from langchain_core.messages import (AIMessage, AIMessageChunk, BaseMessage, ChatMessage, HumanMessage,
                                         SystemMessage)
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
    from pydantic import BaseModel, ConfigDict, Field, model_validator
except ImportError as exc:
    raise ImportError(f"zephyr.integrations.langchain needs langchain-core ({exc.name} is missing): "
                      f"pip install 'zephyr[langchain]'") from exc

from ..config import GENERATION_SETTINGS


class _ZephyrSettings(BaseModel):
    """What both LangChain classes take: where the model comes from, how to load it, how to sample."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: Optional[str] = None
    """A .gguf path, a directory, a Hugging Face repo id, or "demo"."""
    model_file: Optional[str] = None
    gpu_layers: int = 0
    context_length: int = -1
    threads: int = -1
    backend: Optional[str] = None
    chat_format: Optional[str] = None
    load_options: dict = Field(default_factory=dict)
    """Further keyword arguments for `from_pretrained` (Config fields, revision, local_files_only, ...)."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int = -1
    stop: Optional[list[str]] = None

    client: Any = Field(default=None, exclude=True)
    """The loaded zephyr.LLM (loaded from `model` when not given)."""

    @model_validator(mode="after")
    def _load(self):
        if self.client is None:
            if not self.model:
                raise ValueError("pass model= (a .gguf path, a directory, a Hugging Face repo id, or 'demo') "
                                 "or client= (a loaded zephyr.LLM)")
            from ..llm import AutoModelForCausalLM
            self.client = AutoModelForCausalLM.from_pretrained(
                self.model, model_file=self.model_file, gpu_layers=self.gpu_layers,
                context_length=self.context_length, threads=self.threads, backend=self.backend,
                chat_format=self.chat_format, **self.load_options)
        return self

    @property
    def _identifying_params(self) -> dict:
        return {"model": self.model or self.client.model_path, "model_file": self.model_file,
                **self._settings(None, {})}

    def _settings(self, stop, overrides) -> dict:
        """Generation settings for one call: the fields, the call's stop strings and keyword overrides."""
        settings = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                    "top_p": self.top_p, "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                    "stop": list(self.stop or []) + list(stop or [])}
        settings.update({k: v for k, v in overrides.items() if k in GENERATION_SETTINGS})
        return settings


class Zephyr(_ZephyrSettings, LLM):
    """A zephyr model as a LangChain text-completion LLM."""

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


ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}


def to_zephyr_messages(messages: list) -> list:
    """LangChain messages as zephyr's [{"role", "content"}]."""
    converted = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else next(
            (name for cls, name in ROLES.items() if isinstance(message, cls)), None)
        if role is None:
            raise ValueError(f"ChatZephyr cannot send a {type(message).__name__} (no tool calling); "
                             f"use system, human, AI or chat messages")
        converted.append({"role": role, "content": message.text if hasattr(message, "text") else message.content})
    return converted


class ChatZephyr(_ZephyrSettings, BaseChatModel):
    """A zephyr model as a LangChain chat model (prompts built with the model's chat template)."""

    @property
    def _llm_type(self) -> str:
        return "zephyr-chat"

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        text = self.client.chat(to_zephyr_messages(messages), **self._settings(stop, kwargs), stream=False)
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for text in self.client.chat(to_zephyr_messages(messages), **self._settings(stop, kwargs), stream=True):
            if not text:
                continue
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
