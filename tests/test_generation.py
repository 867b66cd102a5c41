"""One request's generation stepped from outside (zephyr.generation): settings merged once, logit
bias, OpenAI's penalties, log-probabilities before the filters, stop strings and lengths."""
import math

import numpy as np
import pytest

from zephyr import Config, Tokenizer
from zephyr.generation import Generation, GenerationSettings
from zephyr.sampling import SamplingParams, adjust


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


def ids(tokenizer, text):
    return tokenizer.encode_continuation(text)


def scripted(tokenizer, favourites, vocab_bonus=10.0):
    """Logits that make favourites[i] the best token at step i (then end-of-generation)."""
    def logits(i):
        out = np.zeros(tokenizer.vocab_size, np.float32)
        out[favourites[i] if i < len(favourites) else tokenizer.eos_id] = vocab_bonus
        return out
    return logits


def run(tokenizer, settings, logits, limit=100):
    generation = Generation(tokenizer, settings)
    steps = []
    while not generation.finished and len(steps) < limit:
        steps.append(generation.step(logits(len(steps))))
    return generation, steps


GREEDY = dict(temperature=0, repetition_penalty=1.0)


def test_settings_merge_once_with_the_config():
    config = Config(temperature=0.3, max_new_tokens=7, stop="END")
    settings = GenerationSettings.merge(config, {"top_k": 5, "temperature": None, "min_p": 0.1})
    assert (settings.temperature, settings.top_k, settings.max_new_tokens, settings.stop, settings.min_p) == \
        (0.3, 5, 7, ("END",), 0.1)
    assert GenerationSettings.merge(config, {"max_new_tokens": -1}).max_new_tokens is None
    with pytest.raises(TypeError, match="unknown generation setting.*temprature"):
        GenerationSettings.merge(config, {"temprature": 1})
    with pytest.raises(ValueError, match="presence_penalty must be between -2 and 2"):
        GenerationSettings(presence_penalty=3)
    with pytest.raises(ValueError, match="logprobs .* from 0 to 20"):
        GenerationSettings(logprobs=21)


def test_text_stops_and_lengths(tokenizer):
    words = ids(tokenizer, "Hello world. Bye")
    generation, steps = run(tokenizer, GenerationSettings(**GREEDY), scripted(tokenizer, words))
    assert "".join(s.text for s in steps) == "Hello world. Bye" and generation.finish_reason == "stop"
    assert steps[-1].token is None and generation.tokens == words     # the end token is not a generated one
    _, steps = run(tokenizer, GenerationSettings(**GREEDY, stop=". B"), scripted(tokenizer, words))
    assert "".join(s.text for s in steps) == "Hello world" and steps[-1].finish_reason == "stop"
    generation, steps = run(tokenizer, GenerationSettings(**GREEDY, max_new_tokens=2), scripted(tokenizer, words))
    assert len(steps) == 2 and generation.finish_reason == "length" and steps[-1].token == words[1]
    with pytest.raises(RuntimeError, match="has finished"):
        generation.step(np.zeros(tokenizer.vocab_size, np.float32))


def test_finish_from_outside_releases_held_back_text(tokenizer):
    generation = Generation(tokenizer, GenerationSettings(**GREEDY, stop="Hello there"))
    step = generation.step(scripted(tokenizer, ids(tokenizer, "Hello"))(0))
    assert step.text == ""   # may begin the stop string
    end = generation.finish("length")
    assert (end.token, end.text, end.finish_reason, generation.finish_reason) == (None, "Hello", "length", "length")


def test_logit_bias_bans_and_forces(tokenizer):
    words = ids(tokenizer, "Hello world")
    banned = {words[0]: -100}
    _, steps = run(tokenizer, GenerationSettings(**GREEDY, logit_bias=banned, max_new_tokens=1),
                   scripted(tokenizer, words))
    assert steps[0].token != words[0]
    forced = {str(words[1]): 100}   # keys as JSON sends them
    _, steps = run(tokenizer, GenerationSettings(**GREEDY, logit_bias=forced, max_new_tokens=3),
                   scripted(tokenizer, words))
    assert [s.token for s in steps] == [words[1]] * 3
    for bad, message in [({10**9: 1}, "outside this model's vocabulary"), ({"x": 1}, "keys must be token ids"),
                         ({5: 101}, r"outside \[-100, 100\]"), ({5: float("nan")}, "finite")]:
        with pytest.raises(ValueError, match=message):
            Generation(tokenizer, GenerationSettings(logit_bias=bad))


def test_presence_and_frequency_penalties_follow_openai():
    logits = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    params = SamplingParams(repetition_penalty=1.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust(logits, params, recent=[0, 1, 1, 2], counts={1: 3, 2: 1})
    np.testing.assert_allclose(out, [1.0, 1.0 - 3 * 0.25 - 0.5, 1.0 - 0.25 - 0.5, 1.0])


def test_frequency_penalty_changes_a_repetitive_greedy_generation(tokenizer):
    word = ids(tokenizer, " la")[0]
    other = ids(tokenizer, " di")[0]

    def logits(_):
        out = np.zeros(tokenizer.vocab_size, np.float32)
        out[word], out[other] = 5.0, 4.0
        return out
    _, plain = run(tokenizer, GenerationSettings(**GREEDY, max_new_tokens=4), logits)
    _, penalised = run(tokenizer, GenerationSettings(**GREEDY, max_new_tokens=4, frequency_penalty=2.0), logits)
    assert [s.token for s in plain] == [word] * 4
    assert [s.token for s in penalised] == [word, other, word, other]


def test_logprobs_come_from_the_model_distribution_before_filters(tokenizer):
    words = ids(tokenizer, "Hi there")
    raw = np.zeros(tokenizer.vocab_size, np.float32)
    raw[words[0]], raw[words[1]] = 10.0, 5.0
    _, steps = run(tokenizer, GenerationSettings(temperature=0.1, top_k=1, logprobs=3, repetition_penalty=1.0,
                                                 logit_bias={words[0]: -100}, max_new_tokens=1), lambda _: raw)
    entry = steps[0].logprobs[0]
    raw = raw.astype(np.float64)
    expected = raw - np.log(np.exp(raw).sum())
    assert entry.id == words[1] and math.isclose(entry.logprob, expected[entry.id], rel_tol=1e-9)
    assert [t[0] for t in entry.top][0] == words[0] and len(entry.top) == 3      # the unbiased best comes first
    assert entry.bytes == tokenizer.token_bytes()[entry.id] and entry.text == entry.bytes.decode()


def test_logprobs_are_released_with_their_text(tokenizer):
    words = ids(tokenizer, "one two. three")
    _, steps = run(tokenizer, GenerationSettings(**GREEDY, logprobs=0, stop=". t"), scripted(tokenizer, words))
    for step in steps[:-1]:
        assert "".join(e.text for e in step.logprobs) == step.text    # what is shown, token by token
    released = [e.id for s in steps for e in s.logprobs]
    assert released == [t for t in words[:len(released)]] and "".join(s.text for s in steps) == "one two"
