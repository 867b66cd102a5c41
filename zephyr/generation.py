"""One request's generation, as an object that is stepped from outside the model loop.

`GenerationSettings` is every setting of one call, merged once: the model's `Config` supplies what
the call leaves unset. `Generation` is the run state of one sequence after its prompt: its sampler
(logit bias, penalties, grammar matcher, random generator), its streaming detokenizer and
stop-string filter, its counters and its finish reason. Whoever owns the model evaluates the
sequence and hands its logits to `step`, which chooses the next token and returns the text and
log-probabilities that token releases:

    generation = Generation(llm.tokenizer, settings, prompt_tokens)
    while not generation.finished:
        step = generation.step(logits)           # logits: [vocab], after the last token of the sequence
        ... show step.text; evaluate step.token unless generation.finished ...

`LLM.steps` drives one Generation this way; a scheduler can drive many, one forward for all.
"""
import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .config import Config
from .grammar import Grammar
from .sampling import SamplingParams, adjust, choose, log_softmax, logit_bias_pairs, new_rng, top_logprobs
from .stopping import StopStringFilter

# The most alternatives a step reports (OpenAI's limit for chat's top_logprobs).
MAX_TOP_LOGPROBS = 20

# Settings a call may pass besides Config's own generation fields, with their defaults.
EXTRA_SETTINGS = {"min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None,
                  "grammar": None, "logprobs": None}


@dataclass(frozen=True)
class GenerationSettings:
    """Everything one generation call needs to know, merged once (see `merge`)."""

    max_new_tokens: Optional[int] = None   # None: until the model stops or the context is full
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    last_n_tokens: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None      # {token id: bias in [-100, 100]}
    seed: int = -1                         # < 0: fresh entropy
    stop: tuple = ()                       # stop strings, never part of the output
    grammar: Optional[Grammar] = None      # the output must match it
    logprobs: Optional[int] = None         # report each token's log-probability and this many alternatives
    stream: bool = False
    reset: bool = True
    batch_size: int = 512
    threads: int = -1

    def __post_init__(self):
        stop = self.stop
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop or ()))
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            object.__setattr__(self, "max_new_tokens", None)
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and
                                              0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs (alternatives per token) must be an integer from 0 to {MAX_TOP_LOGPROBS}, "
                             f"got {self.logprobs!r}")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise TypeError(f"grammar must be a zephyr.Grammar here, not {type(self.grammar).__name__}")
        self.sampling(0)   # the sampler's own checks, at once rather than at the first token

    @classmethod
    def names(cls):
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def merge(cls, config: Config, overrides: dict) -> "GenerationSettings":
        """`config`'s generation fields, with the `overrides` that are not None applied; an unknown
        name is a TypeError, as a misspelt keyword argument should be."""
        unknown = set(overrides) - set(cls.names())
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(cls.names())}")
        values = {name: getattr(config, name, EXTRA_SETTINGS.get(name)) for name in cls.names()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def sampling(self, vocab_size: int) -> SamplingParams:
        """The sampler's parameters; logit_bias ids are checked against `vocab_size` (0: not yet)."""
        bias = logit_bias_pairs(self.logit_bias, vocab_size) if vocab_size else ()
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, last_n_tokens=self.last_n_tokens,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=bias)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before any sampling filter), and the most
    likely alternatives at its position: (id, text, bytes, logprob), most likely first."""

    id: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple = ()


@dataclass
class Step:
    """What one step produced. `token` is the generated token, None when there is none: the model
    chose an end-of-generation token, or the generation was ended from outside (`Generation.finish`)."""

    token: Optional[int]
    text: str                                   # text released now ("" while it may begin a stop string)
    logprobs: list = field(default_factory=list)   # TokenLogprob of the tokens whose text is released now
    finish_reason: Optional[str] = None         # "stop" or "length" on the last step


class Generation:
    """The run state of one sequence after its prompt (see the module docstring)."""

    def __init__(self, tokenizer, settings: GenerationSettings, prompt_tokens=(), extra_stops=()):
        self.tokenizer = tokenizer
        self.settings = settings
        self.params = settings.sampling(tokenizer.vocab_size)
        self.matcher = settings.grammar.matcher(tokenizer) if settings.grammar is not None else None
        self.history = list(prompt_tokens)      # the context so far, for the repetition penalty
        self.tokens = []                        # generated ids (an end-of-generation token excluded)
        self.counts = Counter()                 # how often each token was generated
        self.finish_reason = None
        self._rng = new_rng(settings.seed)
        self._decoder = tokenizer.stream_decoder()
        self._filter = StopStringFilter(list(settings.stop) + list(extra_stops))
        self._decoded = 0                       # characters decoded so far
        self._pending = []                      # (end character, TokenLogprob) not yet released

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: np.ndarray) -> Step:
        """Choose the next token from this sequence's logits [vocab] and take it."""
        if self.finished:
            raise RuntimeError(f"this generation has finished ({self.finish_reason})")
        token = self._choose(logits)
        entry = self._logprob(logits, token) if self.settings.logprobs is not None else None
        if self.tokenizer.is_eog(token):
            return self._end("stop", None)
        self.tokens.append(token)
        self.history.append(token)
        self.counts[token] += 1
        if self.matcher is not None:
            self.matcher.consume(token)
        piece = self._decoder.push(token)
        self._decoded += len(piece)
        if entry is not None:
            self._pending.append((self._decoded, entry))
        text = self._filter.push(piece)
        if self._filter.stopped:
            return self._end("stop", token, text)
        if self.matcher is not None and self.matcher.done:
            return self._end("stop", token, text)
        if self.settings.max_new_tokens is not None and len(self.tokens) >= self.settings.max_new_tokens:
            return self._end("length", token, text)
        return Step(token, text, self._release())

    def finish(self, reason: str) -> Step:
        """End from outside (the context is full: "length"), releasing any text held back."""
        return self._end(reason, None)

    # -- helpers ------------------------------------------------------------------------------
    def _choose(self, logits) -> int:
        n = self.params.last_n_tokens
        recent = self.history[-n:] if n > 0 else (self.history if n < 0 else ())
        adjusted = adjust(logits, self.params, recent, self.counts)
        if self.matcher is None:
            return choose(adjusted, self.params, self._rng)
        if self.params.greedy:
            # the best token is usually allowed: checking it alone is far cheaper than the whole mask
            best = int(np.argmax(adjusted))
            if self.matcher.accepts(best):
                return best
        return choose(np.where(self.matcher.allowed(), adjusted, -np.inf), self.params, self._rng)

    def _logprob(self, logits, token) -> TokenLogprob:
        logprobs = log_softmax(np.asarray(logits))
        top = tuple(self._alternative(int(i), logprobs[i]) for i in top_logprobs(logprobs, self.settings.logprobs))
        return TokenLogprob(*self._alternative(token, logprobs[token]), top)

    def _alternative(self, token, logprob):
        data = self.tokenizer.token_bytes()[token]
        return token, data.decode("utf-8", errors="replace"), data, float(logprob)

    def _end(self, reason, token, text="") -> Step:
        self.finish_reason = reason
        if not self._filter.stopped:
            text += self._filter.push(self._decoder.flush()) + self._filter.flush()
        return Step(token, text, self._release(final=True), reason)

    def _release(self, final=False) -> list:
        """The log-probabilities of the tokens whose text has now been shown: all of them at the end
        (those that made up a stop string too), else those whose last character is out."""
        if not self._pending:
            return []
        if final:
            released, self._pending = [entry for _, entry in self._pending], []
            return released
        shown = self._decoded - len(self._filter.pending)
        cut = 0
        while cut < len(self._pending) and self._pending[cut][0] <= shown:
            cut += 1
        released, self._pending = [entry for _, entry in self._pending[:cut]], self._pending[cut:]
        return released
