"""The ctransformers-compatible API, on the real demo model and on synthetic ones."""
import json
from pathlib import Path

import numpy as np
import pytest

from zephyr import AutoModelForCausalLM, Config, ContextOverflowError, ZephyrError
from zephyr.testing.synthetic import write_llama_model
from zephyr_backends.cpu import _ops

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2_greedy_reference.json").read_text())


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), context_length=512) as model:
        yield model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_llama_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", "tiny", "Q4_0")


def test_config_has_ctransformers_defaults():
    c = Config()
    assert (c.top_k, c.top_p, c.temperature, c.repetition_penalty, c.last_n_tokens, c.seed) == (40, 0.95, 0.8, 1.1, 64, -1)
    assert (c.max_new_tokens, c.stop, c.stream, c.reset, c.batch_size, c.threads) == (256, None, False, True, 512, -1)
    assert (c.context_length, c.gpu_layers, c.mmap, c.mlock) == (-1, 0, True, False)


def test_demo_answers_the_capital_of_france(llm):
    reply = llm.create_chat_completion(messages=QUESTION, temperature=0, max_tokens=40)
    text = reply["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    assert reply["object"] == "chat.completion" and reply["choices"][0]["finish_reason"] == "stop"
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 0


def test_greedy_continuation_agrees_with_llama_cpp(llm):
    """Token ids recorded from llama-cpp-python 0.3.36 (see tests/data/make_greedy_reference.py)."""
    prompt = llm.tokenize(REFERENCE["prompt"], add_bos_token=False)
    assert prompt == REFERENCE["prompt_tokens"]
    generated = []
    for token in llm.generate(prompt, temperature=0, repetition_penalty=1.0):
        generated.append(token)
        if len(generated) == len(REFERENCE["greedy_tokens"]):
            break
    expected = REFERENCE["greedy_tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(generated, expected)) if a != b), len(expected))
    assert agree >= 8, f"diverged at step {agree}: {generated} vs {expected}"
    if agree < len(expected):
        # Logits differ from llama.cpp's by 1-3 % (summation order, its own rounding), so a
        # near-tie may flip; the divergence must be one: the two tokens within 1 % of the scale.
        llm.reset()
        llm.eval(prompt + expected[:agree])
        logits = llm.logits
        margin = abs(float(logits[generated[agree]]) - float(logits[expected[agree]]))
        assert margin <= 0.01 * float(np.abs(logits).max()), \
            f"diverged at step {agree} by {margin:.3f}, no near-tie: {generated} vs {expected}"


def fresh(llm, prompt, **settings):
    """A completion evaluated from an empty context. A repeated prompt otherwise reuses the cached
    prefix and evaluates its last token alone, and a batch of one token rounds activations in a
    different order than a batch of the whole prompt: logits ~1 % apart, enough to pick the other
    side of a near-tie (llama.cpp's batches differ the same way)."""
    llm.reset()
    return llm(prompt, **settings)


def test_streaming_equals_non_streaming(llm):
    full = fresh(llm, "The three primary colors are", max_new_tokens=24, temperature=0)
    chunks = list(fresh(llm, "The three primary colors are", max_new_tokens=24, temperature=0, stream=True))
    assert "".join(chunks) == full and len(chunks) > 1


def test_the_same_prompt_again_evaluates_only_the_answer(llm):
    """A repeated prompt reuses the logits kept after it (as the scheduler's sequences do): only
    answer tokens are evaluated, and the greedy answer is the same to the bit (its last token
    evaluated alone would round differently from the batch it was read in, and could flip a pick
    at a near-tie: seen in CI on a tool call, streamed after the same call unstreamed)."""
    first = llm("The three primary colors are", max_new_tokens=6, temperature=0)
    passes = []
    real = llm.model.forward
    llm.model.forward = lambda tokens, batch, rows=None: passes.append(len(tokens)) or real(tokens, batch, rows)
    try:
        again = llm("The three primary colors are", max_new_tokens=6, temperature=0)
    finally:
        del llm.model.forward
    assert again == first
    assert passes and set(passes) == {1} and len(passes) <= 5   # answer tokens, one at a time


def test_stop_strings_are_never_emitted(llm):
    full = fresh(llm, "Count: 1, 2, 3,", max_new_tokens=20, temperature=0)
    stop = full.strip()[3:6]
    assert stop and stop in full
    stopped = fresh(llm, "Count: 1, 2, 3,", max_new_tokens=20, temperature=0, stop=[stop])
    assert stop not in stopped and full.startswith(stopped)
    streamed = "".join(fresh(llm, "Count: 1, 2, 3,", max_new_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == stopped


def test_same_seed_same_text(llm):
    a = fresh(llm, "Once upon a time", max_new_tokens=16, temperature=1.0, seed=123)
    b = fresh(llm, "Once upon a time", max_new_tokens=16, temperature=1.0, seed=123)
    assert a == b


def test_max_new_tokens(llm):
    prompt = "Once upon a time, in a land far away,"
    produced = list(zip(range(20), llm.generate(llm.tokenize(prompt), temperature=0)))
    assert len(produced) == 20
    text = llm(prompt, max_new_tokens=5, temperature=0)
    assert 0 < len(llm.tokenize(text)) <= 6


def test_chat_streams_and_matches_completion(llm):
    llm.reset()
    chunks = list(llm.chat(QUESTION, stream=True, temperature=0, max_new_tokens=40))
    assert "Paris" in "".join(chunks)
    llm.reset()
    stream = list(llm.create_chat_completion(messages=QUESTION, temperature=0, max_tokens=40, stream=True))
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in stream)
    assert text == "".join(chunks)


def test_eval_sample_logits_and_prefix_reuse(llm):
    llm.reset()
    assert llm.logits is None
    tokens = llm.tokenize("The capital of France is")
    llm.eval(tokens)
    logits = llm.logits
    assert logits.shape == (llm.vocab_size,) and np.isfinite(logits).all()
    assert llm.sample(temperature=0) == int(np.argmax(logits))
    # a longer prompt sharing the prefix only evaluates what is new
    longer = tokens + llm.tokenize(" Paris", add_bos_token=False)
    assert llm.prepare_inputs_for_generation(longer) == longer[len(tokens):]
    assert llm.prepare_inputs_for_generation(tokens) == tokens[-1:]   # re-evaluate the last for its logits
    assert llm.prepare_inputs_for_generation(longer, reset=False) == longer


def test_vocabulary_properties(llm):
    assert llm.vocab_size == 49152 and llm.context_length == 512
    assert llm.eos_token_id == 2 and llm.bos_token_id == 1 and llm.is_eos_token(2) and not llm.is_eos_token(100)
    ids = llm.tokenize("Hello world")
    assert llm.detokenize(ids) == "Hello world"
    assert llm.detokenize(ids, decode=False) == b"Hello world"


def test_embed(llm):
    a, b, c = llm.embed("The cat sat on the mat."), llm.embed("A cat was sitting on a mat."), llm.embed("Quantum chromodynamics.")
    cos = lambda x, y: np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)  # noqa: E731
    assert len(a) == 576 and cos(a, b) > cos(a, c)


def test_context_overflow_is_an_error_not_garbage(tiny_path):
    with AutoModelForCausalLM.from_pretrained(str(tiny_path), context_length=16) as llm:
        with pytest.raises(ContextOverflowError, match="context length 16"):
            llm.eval(list(range(3, 20)))
        llm.eval(list(range(3, 10)))
        with pytest.raises(ContextOverflowError):
            llm.eval(list(range(3, 13)))
        assert len(llm.tokens) == 7          # nothing half-evaluated
        # generation stops cleanly when the window fills
        produced = list(llm.generate(list(range(3, 13)), temperature=0, reset=True))
        assert 0 < len(produced) <= 16 - 10 + 1 and len(llm.tokens) <= 16


def test_unknown_keyword_is_a_type_error(tiny_path):
    with pytest.raises(TypeError, match="gpu_layer"):
        AutoModelForCausalLM.from_pretrained(str(tiny_path), gpu_layer=3)


def test_repack_chooses_the_cpu_layout_and_is_refused_where_it_does_nothing(tiny_path):
    """repack=False keeps every matrix in GGUF order, repack=True interleaves what has a kernel for it
    (the AVX-512 path), and both compute what the host's own choice does, to the rounding of the sums."""
    tokens = list(range(3, 12))

    def run(**kwargs):
        with AutoModelForCausalLM.from_pretrained(str(tiny_path), **kwargs) as llm:
            llm.eval(tokens)
            codes = {w.code != int(w.type) for b in llm.model.blocks for w in (b.wq, b.w_down)}
            return llm.logits.copy(), codes
    chosen, _ = run()
    kept, kept_codes = run(repack=False)
    repacked, repacked_codes = run(repack=True)
    assert kept_codes == {False}
    assert repacked_codes == ({True} if "avx512" in _ops.available_isas() else {False})
    for logits in (kept, repacked):
        assert np.max(np.abs(logits - chosen)) < 5e-2 * np.max(np.abs(chosen))
    with pytest.raises(ValueError, match="repack must be"):
        AutoModelForCausalLM.from_pretrained(str(tiny_path), repack="yes")
    with pytest.raises(ValueError, match="no backend of this placement"):
        AutoModelForCausalLM.from_pretrained(str(tiny_path), backend="reference", repack=True)



def test_a_cache_of_several_sequences_repacks_every_type_unless_told(tiny_path):
    """Left to the backend, sequences > 1 asks the CPU backend for every type interleaved (batches of
    sequences run faster so); an explicit repack still rules, and a backend without the option loads."""
    def cpu_repack(**kwargs):
        with AutoModelForCausalLM.from_pretrained(str(tiny_path), **kwargs) as llm:
            return {b.repack for b in llm.placement.backends if hasattr(b, "repack")}
    assert cpu_repack() == {None}
    assert cpu_repack(sequences=2) == {True}
    assert cpu_repack(sequences=2, repack=False) == {False}
    with AutoModelForCausalLM.from_pretrained(str(tiny_path), backend="reference", sequences=2) as llm:
        assert [b.name for b in llm.placement.backends] == ["reference"]

def test_model_type_is_checked(tiny_path):
    AutoModelForCausalLM.from_pretrained(str(tiny_path), model_type="mistral").close()
    with pytest.raises(ValueError, match="whose architecture is 'llama'"):
        AutoModelForCausalLM.from_pretrained(str(tiny_path), model_type="gpt2")


def test_directory_and_missing_sources(tmp_path, tiny_path):
    (tmp_path / "big.gguf").write_bytes(Path(tiny_path).read_bytes() + b"\0" * 64)
    (tmp_path / "small.gguf").write_bytes(Path(tiny_path).read_bytes())
    with AutoModelForCausalLM.from_pretrained(str(tmp_path)) as llm:
        assert Path(llm.model_path).name == "small.gguf"
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "empty_dir_that_is_missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ZephyrError, match="contains no .gguf file"):
        AutoModelForCausalLM.from_pretrained(str(empty))


def test_hub_repo_id_without_network_is_a_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZephyrError, match="could not get x.gguf from 'nobody/nothing'"):
        AutoModelForCausalLM.from_pretrained("nobody/nothing", model_file="x.gguf", local_files_only=True)


def test_close_and_context_manager(tiny_path):
    llm = AutoModelForCausalLM.from_pretrained(str(tiny_path))
    with llm:
        assert llm("hello", max_new_tokens=2, temperature=0) is not None
    assert llm.model is None and "closed" in repr(llm)


def test_a_cache_that_cannot_fit_is_refused_before_allocation(tiny_path):
    from zephyr import InsufficientMemoryError
    with pytest.raises(InsufficientMemoryError, match=r"KV cache on cpu \(1 x 1000000000 positions, F16\) needs .* smaller context_length"):
        AutoModelForCausalLM.from_pretrained(str(tiny_path), context_length=10**9)


def test_threads_share_one_model_safely(tiny_path):
    import threading
    with AutoModelForCausalLM.from_pretrained(str(tiny_path)) as llm:
        prompts = ["one", "two", "three", "four"]
        expected = {p: llm(p, max_new_tokens=6, temperature=0.7, seed=5) for p in prompts}
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, llm(p, max_new_tokens=6, temperature=0.7,
                                                                                    seed=5))) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == expected


def test_a_stream_closed_half_way_leaves_the_model_usable(tiny_path):
    with AutoModelForCausalLM.from_pretrained(str(tiny_path)) as llm:
        expected = llm("hello there", max_new_tokens=8, temperature=0)
        stream = llm("something else", max_new_tokens=50, temperature=0, stream=True)
        next(stream)
        stream.close()
        assert llm("hello there", max_new_tokens=8, temperature=0) == expected
