"""A real model of a second family: Gemma 3 270M Q4_K_M (the named model gemma3-270m, through the
gemma3_270m_path fixture) against llama.cpp: greedy continuations recorded with llama-cpp-python
(tests/data/make_gemma3_reference.py), of three prompts and of a chat rendered by llama.cpp's
gemma template, and llama.cpp live where it is installed. (The 270M model is pretrained, not
instruction-tuned: its chat answers are as odd in llama.cpp as here.)

Logits differ from llama.cpp's by a few per cent on a real model (8-bit activations amplify every
float-order difference), so a greedy pick may flip where two tokens nearly tie: the tests feed
llama.cpp's tokens and require every pick of zephyr's to be llama.cpp's or a near-tie with it."""
import json
from pathlib import Path

import numpy as np
import pytest

from zephyr import AutoModelForCausalLM
from zephyr.testing.compare import is_near_tie, relative_error

REFERENCE = json.loads((Path(__file__).parent / "data" / "gemma3_270m_greedy_reference.json").read_text())
CHAT = next(case for case in REFERENCE["cases"] if "messages" in case)
# A real model's logits sit a few per cent from llama.cpp's (0.03-0.10 seen); a missed quirk of the
# family makes other text altogether.
LOGIT_TOLERANCE = 0.15
# So two tokens closer than the smallest of those differences are a tie as far as the engines can
# tell (picks 1.6 % apart flipped when a change of layout reordered float sums, on an Intel host).
NEAR_TIE = 0.03


@pytest.fixture(scope="module")
def gemma3(request):
    try:
        path = request.getfixturevalue("gemma3_270m_path")
    except pytest.FixtureLookupError:
        pytest.skip("no gemma3_270m_path fixture here (the named model gemma3-270m)")
    with AutoModelForCausalLM.from_pretrained(str(path), context_length=512) as llm:
        yield llm


def picks_along(llm, tokens, steps):
    """zephyr's logits after the prompt and after each of llama.cpp's next `steps` tokens."""
    llm.reset()
    llm.eval(tokens[:-steps])
    logits = [llm.logits]
    for token in tokens[-steps:-1]:
        llm.eval([token])
        logits.append(llm.logits)
    return logits


def test_it_is_read_as_gemma3(gemma3):
    c = gemma3.model_config
    assert (c.architecture, c.n_layers, c.head_dim, c.sliding_window, c.rope_base_swa) == ("gemma3", 18, 256, 512, 1e4)
    assert [c.is_sliding(i) for i in range(6)] == [True] * 5 + [False]


def prompt_tokens(llm, case):
    """A case's prompt as zephyr tokenizes it; a chat's as create_chat_completion renders it."""
    if "messages" in case:
        return llm.tokenize_chat(llm.chat_format().render(case["messages"]))
    return llm.tokenize(case["prompt"])


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda case: case["prompt"][:20])
def test_greedy_continuation_agrees_with_llama_cpps_recording(gemma3, case):
    assert prompt_tokens(gemma3, case) == case["prompt_tokens"]
    expected = case["greedy_tokens"]
    for step, logits in enumerate(picks_along(gemma3, case["prompt_tokens"] + expected, len(expected))):
        pick = int(np.argmax(logits))
        assert pick == expected[step] or is_near_tie(logits, pick, expected[step], NEAR_TIE), (
            f"step {step}: {pick} rather than llama.cpp's {expected[step]}, and not a near-tie")


def test_logits_agree_with_llama_cpp_live(gemma3, gemma3_270m_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    case = REFERENCE["cases"][0]
    oracle = llama_cpp.Llama(str(gemma3_270m_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    tokens = case["prompt_tokens"] + case["greedy_tokens"][:16]
    # as zephyr runs: the prompt in one batch, then a token at a time (llama.cpp's own picks shift
    # between the two ways by more than a near-tie)
    oracle.eval(case["prompt_tokens"])
    for token in case["greedy_tokens"][:15]:
        oracle.eval([token])
    want = np.array(oracle.scores[len(case["prompt_tokens"]) - 1:len(tokens) - 1])
    oracle.close()
    for step, (got, expected) in enumerate(zip(picks_along(gemma3, tokens, 16), want)):
        assert relative_error(got, expected) < LOGIT_TOLERANCE, f"step {step}"
        a, b = int(np.argmax(got)), int(np.argmax(expected))
        assert a == b or is_near_tie(expected, a, b, NEAR_TIE), f"step {step}: {a} rather than {b}, and not a near-tie"


def test_it_chats_through_its_template(gemma3):
    """The chat API end to end: llama.cpp's prompt (its gemma template) and llama.cpp's reply, up to
    where zephyr's own pick leaves it at a near-tie (test_greedy_continuation_... checks that)."""
    expected = CHAT["greedy_tokens"]
    steps = picks_along(gemma3, CHAT["prompt_tokens"] + expected, len(expected))
    agree = next((i for i, logits in enumerate(steps) if int(np.argmax(logits)) != expected[i]), len(expected))
    gemma3.reset()   # the prompt read in one batch, as picks_along reads it
    reply = gemma3.create_chat_completion(messages=CHAT["messages"], temperature=0, max_tokens=len(expected))
    assert reply["usage"]["prompt_tokens"] == len(CHAT["prompt_tokens"])
    text = reply["choices"][0]["message"]["content"]
    if agree == len(expected):
        assert text == CHAT["greedy_text"]
    else:
        assert text.startswith(gemma3.detokenize(expected[:agree]))
