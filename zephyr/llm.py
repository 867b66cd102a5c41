"""The user-facing model: `AutoModelForCausalLM.from_pretrained(...)` -> `LLM`, a ctransformers drop-in.

Flow: model source -> GGUF file -> ModelConfig + Tokenizer -> placement on backends -> LlamaModel
-> eval/sample loop -> text. `LLM` owns the run state: the tokens already in the KV cache
(`self.tokens`) and the logits of the last one.
"""
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from . import gguf
from .chat import resolve_chat_format
from .backend import KV_CACHE_TYPES, Batch
from .config import DEFAULT_MAX_CONTEXT, GENERATION_SETTINGS, Config, ModelConfig
from .errors import ContextOverflowError, ZephyrError
from .model import LlamaModel
from .placement import plan_placement
from .sampling import SamplingParams, new_rng, sample
from .sources import load_progress
from .stopping import StopStringFilter
from .tokenizer import Tokenizer

# model_type values ctransformers users pass for files zephyr runs, by GGUF architecture.
MODEL_TYPES = {"llama": ("llama", "mistral", "zephyr", "tinyllama", "smollm"), "mistral": ("mistral", "llama")}


class LLM:
    """A loaded model. Not safe for concurrent use from several threads: calls are serialised by a lock."""

    def __init__(self, model_path, config: Config = None, *, model_type=None, backend=None, gpu_backend=None,
                 chat_format=None, progress=None):
        self.model_path = str(model_path)
        self.config = config or Config()
        self._file = gguf.read(model_path)
        try:
            self.model_config = ModelConfig.from_gguf(self._file)
            _check_model_type(model_type, self.model_config.architecture, self._file.path)
            self.tokenizer = Tokenizer.from_gguf(self._file)
            self._chat_format = chat_format
            trained = self.model_config.context_length
            n_ctx = self.config.context_length if self.config.context_length > 0 else min(trained, DEFAULT_MAX_CONTEXT)
            kv_cache_type = KV_CACHE_TYPES.get(str(self.config.kv_cache_type).lower())
            if kv_cache_type is None:
                raise ValueError(f"kv_cache_type={self.config.kv_cache_type!r} is not one of "
                                 f"{', '.join(KV_CACHE_TYPES)}")
            if isinstance(self.config.sequences, bool) or not isinstance(self.config.sequences, int) \
                    or self.config.sequences < 1:
                raise ValueError(f"sequences must be a positive integer, got {self.config.sequences!r}")
            placement = plan_placement(self.model_config.n_layers, backend=backend, gpu_layers=self.config.gpu_layers,
                                       gpu_backend=gpu_backend, options={"threads": self.config.threads})
            self.placement = placement
            with load_progress(progress, self.model_config.n_layers, f"loading {Path(model_path).name}") as report:
                self.model = LlamaModel(self._file, self.model_config, placement, n_ctx, self.config.sequences,
                                        kv_cache_type, progress=report)
        except BaseException:
            self._file.close()
            raise
        self.tokens = []          # ids whose keys/values are in the cache, in order
        self._logits = None       # logits after the last evaluated token: [vocab]
        self._lock = threading.RLock()
        self._epoch = 0           # bumped whenever the context changes; a paused generation checks it

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        if self.model is None:
            raise ZephyrError(f"{Path(self.model_path).name} has been closed; load it again to use it")
        return self.model.n_ctx

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def bos_token_id(self):
        return self.tokenizer.bos_id

    @property
    def eos_token_id(self):
        return self.tokenizer.eos_id

    def is_eos_token(self, token: int) -> bool:
        """True for any end-of-generation token (EOS, end-of-turn, ...)."""
        return self.tokenizer.is_eog(token)

    def tokenize(self, text: str, add_bos_token=None, special=False) -> list:
        return self.tokenizer.encode(text, add_bos=add_bos_token, special=special)

    def tokenize_prompt(self, text: str, add_bos_token=None, special=False) -> list:
        """tokenize(), for text that must fit the context: a text too long to possibly fit raises
        ContextOverflowError at once, before tokenizing megabytes that would be refused anyway."""
        most = self.tokenizer.max_token_chars
        if isinstance(text, str) and most is not None and len(text) > most * self.context_length:
            raise ContextOverflowError(
                f"the prompt has {len(text):,} characters, so it cannot fit the context of {self.context_length} "
                f"tokens (no token is longer than {most} characters): shorten it or load with a larger context_length")
        return self.tokenize(text, add_bos_token=add_bos_token, special=special)

    def detokenize(self, tokens, decode=True):
        """Token ids -> text (bytes when decode=False)."""
        if isinstance(tokens, (int, np.integer)):
            tokens = [int(tokens)]
        text = self.tokenizer.decode(list(tokens))
        return text if decode else text.encode("utf-8")

    # -- evaluation ---------------------------------------------------------------------------
    @property
    def logits(self) -> np.ndarray:
        """Logits [vocab] after the last evaluated token (None before any evaluation)."""
        return None if self._logits is None else self._logits.copy()

    def reset(self):
        """Forget the context (the KV cache is reused from position 0)."""
        with self._lock:
            self.tokens = []
            self._logits = None
            self._epoch += 1

    def eval(self, tokens, *, batch_size=None, threads=None):
        """Append `tokens` to the context, in chunks of `batch_size`."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        batch_size = batch_size or self.config.batch_size
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        with self._lock:
            if len(self.tokens) + len(tokens) > self.context_length:
                raise ContextOverflowError(
                    f"{len(self.tokens)} tokens in context + {len(tokens)} new ones exceed the context length "
                    f"{self.context_length}; reset(), shorten the input, or load with a larger context_length")
            self._set_threads(threads)
            for start in range(0, len(tokens), batch_size):
                chunk = tokens[start:start + batch_size]
                self._logits = self.model.forward(np.array(chunk, dtype=np.int32), Batch.of(len(self.tokens), len(chunk)))[0]
                self.tokens.extend(chunk)
                self._epoch += 1

    def sample(self, *, top_k=None, top_p=None, temperature=None, repetition_penalty=None, last_n_tokens=None,
               seed=None, min_p=0.0, rng=None) -> int:
        """Draw the next token from the current logits."""
        if self._logits is None:
            raise ZephyrError("nothing has been evaluated yet: call eval(tokens) before sample()")
        params = self._sampling_params(top_k, top_p, temperature, repetition_penalty, last_n_tokens, min_p)
        rng = rng or new_rng(self.config.seed if seed is None else seed)
        return sample(self._logits, params, self.tokens, rng)

    def prepare_inputs_for_generation(self, tokens, *, reset=None):
        """The part of `tokens` still to evaluate; with reset, keep the cached prefix they share."""
        tokens = [int(t) for t in tokens]
        reset = self.config.reset if reset is None else reset
        if not reset:
            return tokens
        with self._lock:
            shared = 0
            for a, b in zip(self.tokens, tokens):
                if a != b:
                    break
                shared += 1
            if shared == len(tokens):   # nothing new: re-evaluate the last token to get its logits
                shared -= 1
            self.tokens = self.tokens[:max(shared, 0)]
            self._logits = None
            self._epoch += 1
            return tokens[max(shared, 0):]

    def generate(self, tokens, *, top_k=None, top_p=None, temperature=None, repetition_penalty=None,
                 last_n_tokens=None, seed=None, batch_size=None, threads=None, reset=None, min_p=0.0):
        """Yield generated token ids after `tokens` until an end-of-generation token (not yielded)."""
        params = self._sampling_params(top_k, top_p, temperature, repetition_penalty, last_n_tokens, min_p)
        rng = new_rng(self.config.seed if seed is None else seed)
        with self._lock:
            self.eval(self.prepare_inputs_for_generation(tokens, reset=reset), batch_size=batch_size, threads=threads)
            while True:
                token = sample(self._logits, params, self.tokens, rng)
                if self.is_eos_token(token):
                    return
                epoch = self._epoch
                yield token
                if self._epoch != epoch:
                    raise ZephyrError("another call used the model while this generation was paused (in the same "
                                      "thread), so its context is gone; finish or close one stream before the next")
                if len(self.tokens) >= self.context_length:
                    return   # the context is full: generation ends (finish reason "length")
                self.eval([token], threads=threads)

    # -- text in, text out --------------------------------------------------------------------
    def __call__(self, prompt: str, **kwargs):
        """Complete `prompt`; a string, or a generator of text chunks with stream=True."""
        pieces = self.completion_stream(self.tokenize_prompt(prompt), **kwargs)
        streaming = kwargs.get("stream")
        if self.config.stream if streaming is None else streaming:
            return (chunk for chunk, _ in pieces)
        return "".join(chunk for chunk, _ in pieces)

    def completion_stream(self, prompt_tokens, *, extra_stops=(), on_token=None, min_p=0.0, **settings):
        """Generate after the token ids `prompt_tokens`, as (text, finish_reason or None) pairs; the
        last pair carries the finish reason, "stop" or "length". `settings` are the generation
        settings of __call__ (unset ones come from the config); `extra_stops` add stop strings
        (a chat format's); on_token(id), if given, is called for every generated token (the server
        counts usage with it). What __call__, chat and the server build on."""
        return self._text_stream(prompt_tokens, dict(self._settings(settings), min_p=min_p), extra_stops, on_token)

    def _text_stream(self, prompt_tokens, settings, extra_stops=(), on_token=None):
        stop = settings["stop"]
        stops = ([stop] if isinstance(stop, str) else list(stop or [])) + list(extra_stops)
        if len(prompt_tokens) >= self.context_length:
            raise ContextOverflowError(f"the prompt has {len(prompt_tokens)} tokens; the context length is "
                                       f"{self.context_length}: shorten it or load with a larger context_length")
        decoder = self.tokenizer.stream_decoder()
        text_filter = StopStringFilter(stops)
        finish = "stop"
        generation = self.generate(prompt_tokens, **{k: settings[k] for k in (
            "top_k", "top_p", "temperature", "repetition_penalty", "last_n_tokens", "seed", "batch_size",
            "threads", "reset")}, min_p=settings["min_p"])
        try:
            count = 0
            for token in generation:
                count += 1
                if on_token:
                    on_token(token)
                chunk = text_filter.push(decoder.push(token))
                if chunk:
                    yield chunk, None
                if text_filter.stopped:
                    break
                if count >= settings["max_new_tokens"]:
                    finish = "length"
                    break
            else:
                if len(self.tokens) >= self.context_length:
                    finish = "length"
            if not text_filter.stopped:
                tail = text_filter.push(decoder.flush()) + text_filter.flush()
                if tail:
                    yield tail, None
        finally:
            generation.close()
        yield "", finish

    # -- chat ---------------------------------------------------------------------------------
    def chat_format(self, chat_format=None):
        return resolve_chat_format(self._file.metadata, chat_format or self._chat_format)

    def chat_prompt(self, messages, chat_format=None):
        """The token ids of `messages` rendered by the chat format, ending where the reply begins,
        and that format (its stop strings end the reply)."""
        formatter = self.chat_format(chat_format)
        text = formatter.render(messages, add_generation_prompt=True)
        # The template may emit the BOS text itself; never add a second BOS.
        bos_text = self.tokenizer.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        add_bos = False if bos_text and text.startswith(bos_text) else None
        return self.tokenize_prompt(text, add_bos_token=add_bos, special=True), formatter

    def chat(self, messages, stream=False, chat_format=None, **kwargs):
        """Reply to a conversation (list of {"role", "content"}): a string, or chunks with stream=True."""
        tokens, formatter = self.chat_prompt(messages, chat_format)
        chunks = (c for c, _ in self.completion_stream(tokens, extra_stops=formatter.stop, **kwargs))
        return chunks if stream else "".join(chunks)

    def create_chat_completion(self, messages, *, temperature=0.2, top_p=0.95, top_k=40, min_p=0.05,
                               max_tokens=None, stop=None, stream=False, seed=None, repeat_penalty=1.0,
                               chat_format=None, model=None, **unused_openai_fields):
        """OpenAI-shaped chat completion (a dict, or an iterator of chunk dicts with stream=True),
        with llama-cpp-python's defaults."""
        tokens, formatter = self.chat_prompt(messages, chat_format)
        generated = []
        pieces = self.completion_stream(tokens, extra_stops=formatter.stop, on_token=generated.append, min_p=min_p,
                                        temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
                                        repetition_penalty=repeat_penalty, seed=seed,
                                        max_new_tokens=max_tokens if max_tokens else self.context_length)
        ident, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model or Path(self.model_path).name
        if stream:
            return _chat_chunks(pieces, ident, created, name)
        text, finish = "", None
        for chunk, reason in pieces:
            text += chunk
            finish = reason or finish
        completion_tokens = len(generated)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": completion_tokens,
                      "total_tokens": len(tokens) + completion_tokens},
        }

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, input, *, batch_size=None, threads=None) -> list:
        """Mean of the final (normed) hidden states of `input` (text or token ids). Clears the context."""
        tokens = self.tokenize_prompt(input) if isinstance(input, str) else [int(t) for t in input]
        if not tokens:
            raise ValueError("cannot embed an empty input")
        if len(tokens) > self.context_length:
            raise ContextOverflowError(f"{len(tokens)} tokens exceed the context length {self.context_length}")
        batch_size = batch_size or self.config.batch_size
        with self._lock:
            self.reset()
            self._set_threads(threads)
            states = [self.model.hidden_states(np.array(tokens[s:s + batch_size], np.int32),
                                               Batch.of(s, len(tokens[s:s + batch_size])))
                      for s in range(0, len(tokens), batch_size)]
            self.reset()
        return np.concatenate(states).mean(axis=0).tolist()

    # -- lifetime -----------------------------------------------------------------------------
    def close(self):
        """Release the weights and caches (the memory map is unmapped once nothing uses it)."""
        with self._lock:
            self.model = None
            self.placement = None
            self._logits = None
            self.tokens = []
            self._epoch += 1
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<zephyr.LLM {Path(self.model_path).name} ctx={self.model.n_ctx if self.model else 'closed'}>"

    # -- helpers ------------------------------------------------------------------------------
    def _settings(self, kwargs) -> dict:
        unknown = set(kwargs) - set(GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(GENERATION_SETTINGS)}")
        settings = {name: getattr(self.config, name) for name in GENERATION_SETTINGS}
        settings.update({k: v for k, v in kwargs.items() if v is not None})
        if settings["max_new_tokens"] is None or settings["max_new_tokens"] < 0:
            settings["max_new_tokens"] = self.context_length
        return settings

    def _sampling_params(self, top_k, top_p, temperature, repetition_penalty, last_n_tokens, min_p):
        c = self.config
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingParams(temperature=pick(temperature, c.temperature), top_k=pick(top_k, c.top_k),
                              top_p=pick(top_p, c.top_p), min_p=min_p or 0.0,
                              repetition_penalty=pick(repetition_penalty, c.repetition_penalty),
                              last_n_tokens=pick(last_n_tokens, c.last_n_tokens))

    def _set_threads(self, threads):
        """A per-call thread count, for the backends that take one."""
        if threads and threads > 0:
            for backend in self.placement.backends:
                if "threads" in backend.options:
                    backend.threads = threads


def _chat_chunks(pieces, ident, created, name):
    def chunk(delta, finish=None):
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant"})
    for text, finish in pieces:
        if text:
            yield chunk({"content": text})
        if finish:
            yield chunk({}, finish)


def _check_model_type(model_type, architecture, path):
    if model_type is None:
        return
    if model_type.lower() not in MODEL_TYPES.get(architecture, (architecture,)):
        raise ValueError(f"model_type={model_type!r} does not match {path}, whose architecture is "
                         f"{architecture!r}; leave model_type out (zephyr reads it from the file)")


class AutoModelForCausalLM:
    """ctransformers-style entry point."""

    @classmethod
    def from_pretrained(cls, model_path_or_repo_id, *, model_type=None, model_file=None, config=None,
                        local_files_only=False, revision=None, backend=None, gpu_backend=None,
                        chat_format=None, progress=None, **kwargs) -> LLM:
        """Load a GGUF model from a file, a directory, or a Hugging Face repo id.

        Keyword arguments are `Config` fields (gpu_layers=..., context_length=..., threads=...).
        progress: None shows progress bars when stderr is a terminal; True always, False never;
        a callable(done, total) is called as the layers load.
        """
        from .sources import resolve_model_file
        config = (config or Config()).updated(**kwargs)
        path = resolve_model_file(model_path_or_repo_id, model_file=model_file, local_files_only=local_files_only,
                                  revision=revision, progress=progress)
        return LLM(path, config, model_type=model_type, backend=backend, gpu_backend=gpu_backend,
                   chat_format=chat_format, progress=progress)
