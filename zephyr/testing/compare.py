"""Comparing two engines' outputs on one model: what may differ, and by how much."""
import numpy as np

# Two engines that round activations to 8 bits can see one value land on either side of a rounding
# boundary; the logits then differ by 1-2 % (random models), and a greedy pick can flip where the
# top two logits are closer than this fraction of the logit scale. A wrong kernel is off by far more.
NEAR_TIE = 0.01


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def is_near_tie(logits, a: int, b: int, tolerance: float = NEAR_TIE) -> bool:
    """Whether tokens a and b score within `tolerance` of the logit scale of each other."""
    logits = np.asarray(logits, np.float64)
    return abs(logits[a] - logits[b]) <= tolerance * np.max(np.abs(logits))


def greedy_flip_is_a_near_tie(got_logits, want_logits, tolerance: float = NEAR_TIE) -> bool:
    """For two engines' logits of one step: their greedy picks agree, or differ at a near-tie of
    the expected logits (closer than `tolerance` of the logit scale: the error the engines may have)."""
    a, b = int(np.argmax(got_logits)), int(np.argmax(want_logits))
    return a == b or is_near_tie(want_logits, a, b, tolerance)
