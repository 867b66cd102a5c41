"""Choosing the next token: small pure functions from logits to a token id.

The order follows llama.cpp's sampler chain: repetition penalty -> top-k -> top-p -> min-p ->
temperature -> draw. Temperature <= 0 or top_k == 1 means greedy (argmax after the penalty).
"""
import numbers
from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40            # <= 0: no limit
    top_p: float = 0.95        # >= 1: off
    min_p: float = 0.0         # <= 0: off
    repetition_penalty: float = 1.1
    last_n_tokens: int = 64    # how far back the penalty looks; 0: nowhere, -1: the whole history

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


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


def sample(logits: np.ndarray, params: SamplingParams, recent=(), rng: np.random.Generator = None) -> int:
    """One token id from vocabulary logits [vocab]."""
    recent = list(recent)
    n = params.last_n_tokens
    window = recent[-n:] if n > 0 else (recent if n < 0 else [])
    logits = penalize_repetition(np.asarray(logits, dtype=np.float32), window, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    ids, kept = candidates(logits, params)
    # shifted before dividing, so the best candidate scores 0 and a tiny temperature can only push
    # the others to -inf (probability 0), never overflow into NaN
    with np.errstate(over="ignore"):
        probs = softmax((kept.astype(np.float64) - kept.max()) / params.temperature)
    rng = rng if rng is not None else new_rng(-1)
    return int(ids[rng.choice(len(ids), p=probs)])
