"""Choosing the next token: small pure functions from logits to a token id.

The order follows llama.cpp's sampler chain: logit bias -> repetition, frequency and presence
penalties -> top-k -> top-p -> min-p -> temperature -> draw. Temperature <= 0 or top_k == 1 means
greedy (argmax after the bias and penalties). A grammar's mask (zephyr.grammar) applies to the
adjusted logits, before the filters.
"""
import numbers
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # <= 0: no limit
    top_p: float = 0.95        # >= 1: off
    min_p: float = 0.0         # <= 0: off
    repetition_penalty: float = 1.1
    last_n_tokens: int = 64    # how far back the penalty looks; 0: nowhere, -1: the whole history
    presence_penalty: float = 0.0    # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0   # OpenAI's: subtracted once per time a token was generated
    logit_bias: tuple = ()     # (token id, bias) pairs added to the logits; -100 bans, 100 forces

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check_finite(name, getattr(self, name))
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2 (OpenAI's range), got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            _check_finite(f"logit_bias[{token}]", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


def _check_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def logit_bias_pairs(logit_bias, vocab_size: int) -> tuple:
    """A {token id: bias} mapping (ids as ints or, as JSON sends them, digit strings) as sorted
    (id, bias) pairs, each id checked against the vocabulary and each bias in OpenAI's [-100, 100]."""
    if not logit_bias:
        return ()
    if not isinstance(logit_bias, Mapping):
        raise ValueError(f"logit_bias must map token ids to numbers, got {type(logit_bias).__name__}")
    pairs = {}
    for key, bias in logit_bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias names token {token}, outside this model's vocabulary [0, {vocab_size})")
        _check_finite(f"logit_bias[{key!r}]", bias)
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias[{key!r}] = {bias} is outside [-100, 100]")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


def new_rng(seed: int) -> np.random.Generator:
    """Seeded generator; a negative seed means fresh entropy (different text each time)."""
    return np.random.default_rng(None if seed is None or seed < 0 else seed)


def penalize_repetition(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty on tokens seen recently: positive logits divided, negative multiplied."""
    ids = np.unique(np.fromiter(recent, dtype=np.int64))
    if penalty == 1.0 or ids.size == 0:
        return logits
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.astype(np.float64)   # a huge penalty must not overflow float32
    chosen = out[ids]
    out[ids] = np.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out


def penalize_occurrences(logits: np.ndarray, counts: Mapping[int, int], presence: float,
                         frequency: float) -> np.ndarray:
    """OpenAI's penalties: logit[j] -= counts[j] * frequency + (counts[j] > 0) * presence, where
    counts are how often each token was generated so far."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    times = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    out = logits.astype(np.float64)
    out[ids] -= times * frequency + presence
    return out


def adjust(logits: np.ndarray, params: SamplingParams, recent=(), counts: Mapping[int, int] = None) -> np.ndarray:
    """The logits the filters see: logit bias, then the repetition penalty over the last
    `last_n_tokens` of `recent`, then the presence and frequency penalties over `counts`. The input
    is never modified."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        logits = logits.astype(np.float64)
        logits[list(ids)] += bias
    n = params.last_n_tokens
    if params.repetition_penalty != 1.0 and n != 0:
        recent = list(recent)
        logits = penalize_repetition(logits, recent[-n:] if n > 0 else recent, params.repetition_penalty)
    return penalize_occurrences(logits, counts, params.presence_penalty, params.frequency_penalty)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())


def top_logprobs(logprobs: np.ndarray, n: int):
    """The ids of the `n` most likely tokens, most likely first."""
    n = min(n, logprobs.shape[0])
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    ids = np.argpartition(-logprobs, n - 1)[:n]
    return ids[np.argsort(-logprobs[ids], kind="stable")]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def candidates(logits: np.ndarray, params: SamplingParams):
    """(token ids, their logits) that survive top-k, top-p and min-p, most likely first."""
    k = logits.shape[0] if params.top_k <= 0 else min(params.top_k, logits.shape[0])
    ids = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    kept = logits[ids]
    probs = softmax(kept)
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        ids, kept, probs = ids[:cut], kept[:cut], probs[:cut]
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs[0]
        ids, kept = ids[keep], kept[keep]
    return ids, kept


def sample(logits: np.ndarray, params: SamplingParams, recent=(), rng: np.random.Generator = None,
           counts: Mapping[int, int] = None) -> int:
    """One token id from vocabulary logits [vocab]; `recent`: the context, for the repetition penalty;
    `counts`: how often each token was generated, for the presence and frequency penalties."""
    return choose(adjust(logits, params, recent, counts), params, rng)


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator = None) -> int:
    """One token id from logits already adjusted (and masked, under a grammar): greedy, or a draw
    from what survives top-k, top-p and min-p at the temperature."""
    if params.greedy:
        return int(np.argmax(logits))
    ids, kept = candidates(logits, params)
    # shifted before dividing, so the best candidate scores 0 and a tiny temperature can only push
    # the others to -inf (probability 0), never overflow into NaN
    with np.errstate(over="ignore"):
        probs = softmax((kept.astype(np.float64) - kept.max()) / params.temperature)
    rng = rng if rng is not None else new_rng(-1)
    return int(ids[rng.choice(len(ids), p=probs)])
