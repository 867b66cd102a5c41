"""The user-facing model: `AutoModelForCausalLM.from_pretrained(...)` -> `LLM`, a ctransformers drop-in.

Flow: model source -> GGUF file -> ModelConfig + Tokenizer -> placement on backends -> LlamaModel
-> eval/sample loop -> text. `LLM` owns the run state: the tokens already in the KV cache
(`self.tokens`) and the logits of the last one.
"""
import threading
from pathlib import Path

import numpy as np

from . import gguf
from .chat import resolve_chat_format
from .backend import KV_CACHE_TYPES, Batch
from .completions import ChatCompletion, TextCompletion
from .config import DEFAULT_MAX_CONTEXT, Config, ModelConfig
from .errors import ContextOverflowError, ZephyrError
from .generation import Generation, GenerationSettings
from .grammar import grammar_from
from .model import LlamaModel
from .placement import plan_placement
from .sampling import new_rng, sample
from .sources import load_progress
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
            if self.config.repack not in (None, True, False):
                raise ValueError(f"repack must be True, False or None (the backend's choice), got "
                                 f"{self.config.repack!r}")
            # Left to the backend, a cache of several sequences (a server's slots, batches) asks for every
            # type interleaved: the interleaved kernels run a step of several sequences at little more
            # than one's cost (7B Q4_K_M, 4 sequences on an AMD host: 146 ms against 226 row-major).
            repack = True if self.config.repack is None and self.config.sequences > 1 else self.config.repack
            placement = plan_placement(self.model_config.n_layers, backend=backend, gpu_layers=self.config.gpu_layers,
                                       gpu_backend=gpu_backend, options={"threads": self.config.threads, "repack": repack})
            if self.config.repack is not None and not any("repack" in b.options for b in placement.backends):
                names = ", ".join(sorted({b.name for b in placement.backends}))
                raise ValueError(f"repack={self.config.repack} has no effect here: no backend of this placement "
                                 f"({names}) repacks weights; leave repack out")
            self.placement = placement
            with load_progress(progress, self.model_config.n_layers, f"loading {Path(model_path).name}") as report:
                self.model = LlamaModel(self._file, self.model_config, placement, n_ctx, self.config.sequences,
                                        kv_cache_type, progress=report)
        except BaseException:
            self._file.close()
            raise
        self.tokens = []          # ids whose keys/values are in the cache, in order
        self._logits = None       # logits after the last evaluated token: [vocab]
        self._after_prompt = None  # (prompt ids, the logits after them) of the last generation
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
        settings = self.settings(top_k=top_k, top_p=top_p, temperature=temperature, min_p=min_p, seed=seed,
                                 repetition_penalty=repetition_penalty, last_n_tokens=last_n_tokens)
        return sample(self._logits, settings.sampling(self.vocab_size), self.tokens, rng or new_rng(settings.seed))

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
            if shared == len(tokens):   # nothing new
                if self._after_prompt is not None and self._after_prompt[0] == tokens:
                    # the same prompt again: its logits were kept, so it answers to the bit as before
                    # (its last token evaluated alone rounds differently from the batch it was read in)
                    self.tokens = self.tokens[:shared]
                    self._logits = self._after_prompt[1].copy()
                    self._epoch += 1
                    return []
                shared -= 1   # re-evaluate the last token to get its logits
            self.tokens = self.tokens[:max(shared, 0)]
            self._logits = None
            self._epoch += 1
            return tokens[max(shared, 0):]

    def generate(self, tokens, *, top_k=None, top_p=None, temperature=None, repetition_penalty=None,
                 last_n_tokens=None, seed=None, batch_size=None, threads=None, reset=None, min_p=0.0,
                 presence_penalty=None, frequency_penalty=None, logit_bias=None, grammar=None):
        """Yield generated token ids after `tokens` until an end-of-generation token (not yielded), the
        end of `grammar` (GBNF text or a zephyr.Grammar), or a full context."""
        settings = self.settings(top_k=top_k, top_p=top_p, temperature=temperature, min_p=min_p, seed=seed,
                                 repetition_penalty=repetition_penalty, last_n_tokens=last_n_tokens,
                                 presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                 logit_bias=logit_bias, grammar=grammar, batch_size=batch_size, threads=threads,
                                 reset=reset, max_new_tokens=-1, stop=())
        for step in self.steps(tokens, settings):
            if step.token is not None:
                yield step.token

    def steps(self, prompt_tokens, settings: GenerationSettings, extra_stops=()):
        """Generate after the token ids `prompt_tokens`: one `Generation` driven on this model, yielding
        its `Step`s (token, text released, log-probabilities), the last with the finish reason."""
        with self._lock:
            pending = self.prepare_inputs_for_generation(prompt_tokens, reset=settings.reset)
            generation = Generation(self.tokenizer, settings, self.tokens + pending, extra_stops)
            self.eval(pending, batch_size=settings.batch_size, threads=settings.threads)
            if pending:
                self._after_prompt = (list(self.tokens), self._logits.copy())
            while True:
                step = generation.step(self._logits)
                epoch = self._epoch
                yield step
                if generation.finished:
                    return
                if self._epoch != epoch:
                    raise ZephyrError("another call used the model while this generation was paused (in the same "
                                      "thread), so its context is gone; finish or close one stream before the next")
                if len(self.tokens) >= self.context_length:
                    yield generation.finish("length")   # the context is full
                    return
                self.eval([step.token], threads=settings.threads)

    # -- text in, text out --------------------------------------------------------------------
    def settings(self, **overrides) -> GenerationSettings:
        """One call's settings, merged once: this model's Config, with the `overrides` that are not
        None. `grammar` may be GBNF text and `response_format` an OpenAI response format."""
        if "grammar" in overrides or "response_format" in overrides:
            overrides["grammar"] = grammar_from(overrides.get("grammar"), overrides.pop("response_format", None))
        return GenerationSettings.merge(self.config, overrides)

    def __call__(self, prompt: str, **settings):
        """Complete `prompt`; a string, or a generator of text chunks with stream=True. Settings are
        GenerationSettings fields (Config's generation fields, min_p, penalties, logit_bias, grammar)."""
        settings = self.settings(**settings)
        pieces = self.completion_stream(self.tokenize_prompt(prompt), settings)
        if settings.stream:
            return (chunk for chunk, _ in pieces)
        return "".join(chunk for chunk, _ in pieces)

    def generate_batch(self, prompts, **settings) -> list:
        """Complete many prompts at once: their texts, in order. Settings as for __call__. Up to
        `sequences` prompts (a Config field: the KV cache's sequences) are generated together, one
        forward pass for all per token; more wait for a free sequence, reusing what it holds."""
        from .generation import Generation
        from .scheduler import Request, Scheduler
        settings = self.settings(**settings)
        texts, requests = [], []
        for i, prompt in enumerate(prompts):
            tokens = self.tokenize_prompt(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            self.check_prompt(tokens)
            texts.append([])
            requests.append(Request(tokens, [Generation(self.tokenizer, settings, tokens)],
                                    lambda event, out=texts[-1]: out.append(event.step.text) if event.step else None))
        for request in Scheduler(self).run(requests):
            if request.error is not None:
                raise request.error
        return ["".join(parts) for parts in texts]

    def completion_stream(self, prompt_tokens, settings: GenerationSettings = None, *, extra_stops=(),
                          on_token=None, **overrides):
        """Generate after the token ids `prompt_tokens`, as (text, finish_reason or None) pairs; the
        last pair carries the finish reason, "stop" or "length". `settings` (else `overrides` merged
        with the config) say how; `extra_stops` add stop strings (a chat format's); on_token(id), if
        given, is called for every generated token."""
        settings = settings or self.settings(**overrides)
        self.check_prompt(prompt_tokens)
        for step in self.steps(prompt_tokens, settings, extra_stops):
            if on_token and step.token is not None:
                on_token(step.token)
            if step.text or step.finish_reason:
                yield step.text, step.finish_reason

    def check_prompt(self, prompt_tokens):
        """ContextOverflowError unless `prompt_tokens` leave room for at least one generated token."""
        if len(prompt_tokens) >= self.context_length:
            raise ContextOverflowError(f"the prompt has {len(prompt_tokens)} tokens; the context length is "
                                       f"{self.context_length}: shorten it or load with a larger context_length")

    def create_completion(self, prompt, *, max_tokens=16, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05,
                          repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None,
                          stop=None, seed=None, grammar=None, response_format=None, logprobs=None, n=None,
                          stream=False, model=None):
        """OpenAI-shaped text completion of `prompt` (text or token ids): a dict, or an iterator of chunk
        dicts with stream=True; llama-cpp-python's defaults."""
        completion = TextCompletion(self, prompt, dict(
            max_new_tokens=max_tokens or -1, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repeat_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logit_bias=logit_bias, stop=stop, seed=seed, grammar=grammar), response_format=response_format,
            logprobs=logprobs, n=n, model=model)
        return completion.run(self, stream)

    # -- chat ---------------------------------------------------------------------------------
    def chat_format(self, chat_format=None):
        return resolve_chat_format(self._file.metadata, chat_format or self._chat_format)

    def chat_prompt(self, messages, chat_format=None, **template_variables):
        """The token ids of `messages` rendered by the chat format, ending where the reply begins,
        and that format (its stop strings end the reply). `template_variables` (such as `tools`) go
        to the template."""
        formatter = self.chat_format(chat_format)
        return self.tokenize_chat(formatter.render(messages, add_generation_prompt=True, **template_variables)), \
            formatter

    def tokenize_chat(self, text):
        """Token ids of a rendered chat prompt: special tokens parsed, and no second BOS when the
        template wrote one."""
        bos_text = self.tokenizer.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        add_bos = False if bos_text and text.startswith(bos_text) else None
        return self.tokenize_prompt(text, add_bos_token=add_bos, special=True)

    def chat(self, messages, stream=False, chat_format=None, **settings):
        """Reply to a conversation (list of {"role", "content"}): a string, or chunks with stream=True.
        Settings as for __call__, plus `response_format` (OpenAI's, for JSON output)."""
        tokens, formatter = self.chat_prompt(messages, chat_format)
        chunks = (c for c, _ in self.completion_stream(tokens, self.settings(**settings), extra_stops=formatter.stop))
        return chunks if stream else "".join(chunks)

    def create_chat_completion(self, messages, *, temperature=0.2, top_p=0.95, top_k=40, min_p=0.05,
                               max_tokens=None, stop=None, stream=False, seed=None, repeat_penalty=1.0,
                               presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, grammar=None,
                               response_format=None, tools=None, tool_choice=None, parallel_tool_calls=None,
                               logprobs=None, top_logprobs=None, n=None, chat_format=None, model=None):
        """OpenAI-shaped chat completion (a dict, or an iterator of chunk dicts with stream=True),
        with llama-cpp-python's defaults: JSON output through `response_format`, GBNF through
        `grammar`, function calling through `tools` and `tool_choice`, and log-probabilities."""
        completion = ChatCompletion(self, messages, dict(
            max_new_tokens=max_tokens or -1, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repeat_penalty, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            logit_bias=logit_bias, stop=stop, seed=seed, grammar=grammar), response_format=response_format,
            tools=tools, tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls, logprobs=logprobs,
            top_logprobs=top_logprobs, n=n, chat_format=chat_format, model=model)
        return completion.run(self, stream)

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
    def _set_threads(self, threads):
        """A per-call thread count, for the backends that take one."""
        if threads and threads > 0:
            for backend in self.placement.backends:
                if "threads" in backend.options:
                    backend.threads = threads


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
