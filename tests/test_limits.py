"""Resource limits: memory is sized before it is allocated, and no request can run past the context.

Each limit must refuse with a zephyr error that says what to change, before the work or the
allocation it guards (docs/api.md "Context window", docs/security.md).
"""
import os
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import replace

import pytest
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zephyr import AutoModelForCausalLM, ContextOverflowError, InsufficientMemoryError, memory, model
from zephyr.backend import Batch, CacheShape, HostKVCache
from zephyr.testing.synthetic import PRESETS, write_llama_model

SMALL = replace(PRESETS["tiny"], vocab_size=300)


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    return write_llama_model(tmp_path_factory.mktemp("limits") / "small.gguf", SMALL, "Q4_K_M")


@pytest.fixture
def llm(small_path):
    with AutoModelForCausalLM.from_pretrained(str(small_path), context_length=32, threads=1) as loaded:
        yield loaded


@pytest.fixture
def forward_calls(llm, monkeypatch):
    """How many times the network ran."""
    calls = []
    real = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


# ---- memory ---------------------------------------------------------------------------------------

def test_kv_cache_is_refused_before_it_is_allocated(small_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(InsufficientMemoryError, match=r"KV cache on cpu \(1 x 100000 positions, F16\) needs "
                                                          r"0\.10 GiB but only 0\.06 GiB .* smaller context_length"):
            AutoModelForCausalLM.from_pretrained(str(small_path), context_length=100_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_kv_cache_respects_an_address_space_limit(small_path):
    """ulimit -v (and a container's memory limit) count, not just the machine's free memory."""
    script = textwrap.dedent(f"""
        import resource
        from zephyr import AutoModelForCausalLM, InsufficientMemoryError
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, resource.RLIM_INFINITY))
        try:
            AutoModelForCausalLM.from_pretrained({str(small_path)!r}, context_length=4_000_000)
        except InsufficientMemoryError as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "refused: the KV cache on cpu (1 x 4000000 positions, F16) needs 3.81 GiB" in done.stdout, \
        done.stdout + done.stderr


def test_working_buffers_of_a_huge_batch_are_refused_before_allocation(llm, monkeypatch, forward_calls):
    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 10)
    monkeypatch.setattr(model, "WORKING_MEMORY_CHECK_BYTES", 0)
    with pytest.raises(InsufficientMemoryError, match="activations of a batch of 28 tokens .* smaller batch_size"):
        llm.eval(list(range(3, 33 - 2)), batch_size=64)
    assert llm.tokens == []
    monkeypatch.setattr(memory, "available_memory", lambda: 64 << 20)
    llm.eval(list(range(3, 33 - 2)), batch_size=4)     # the same tokens in small batches fit
    assert len(llm.tokens) == 28


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc/self/statm")
def test_a_kv_cache_takes_memory_only_where_it_is_written():
    """A sequence's first token writes a row into every head's run of positions; that must not
    commit the sequence's whole share of the cache (np.zeros' transparent huge pages did: 64 MiB
    here, and a 7B model's first prompt paid 0.3-0.8 s zeroing them)."""
    shape = CacheShape(n_layers=4, n_seqs=2, n_ctx=4096, n_kv_heads=8, head_dim=128)   # 128 MiB
    cache = HostKVCache(shape)
    before = resident_bytes()
    rows = np.ones((1, 8 * 128), np.float32)
    for layer in range(shape.n_layers):
        cache.store(layer, Batch.of(0, 1, 1), rows, rows)
    grown = resident_bytes() - before
    assert grown < 8 << 20, f"writing 64 rows of 256 bytes took {grown / 2**20:.1f} MiB"
    assert np.all(cache.rows(0, 1, 1, 1) == 1) and not cache.data[:, :, 0].any()


def test_a_reservation_the_os_refuses_is_a_clear_memory_error():
    script = textwrap.dedent("""
        import resource
        from zephyr import InsufficientMemoryError, memory
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY))
        try:
            memory.lazy_zeros((4 << 30,))
        except InsufficientMemoryError as exc:
            print("refused:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "refused: could not reserve 4.00 GiB of memory" in done.stdout, done.stdout + done.stderr


def test_available_memory_is_the_least_of_every_limit(monkeypatch):
    monkeypatch.setattr(memory, "_system_available", lambda: 8 << 30)
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 2 << 30)
    monkeypatch.setattr(memory, "_address_space_left", lambda: memory.UNKNOWN)
    assert memory.available_memory() == 2 << 30


# ---- the context window -------------------------------------------------------------------------

@pytest.mark.parametrize("call", ["complete", "stream", "chat", "chat completion", "embed", "eval"])
def test_a_prompt_longer_than_the_context_is_refused_before_evaluation(llm, forward_calls, call):
    llm.eval([5, 6, 7])
    forward_calls.clear()
    text = " ".join(["e"] * 200)
    messages = [{"role": "user", "content": text}]
    with pytest.raises(ContextOverflowError, match="32"):
        if call == "complete":
            llm(text)
        elif call == "stream":
            next(llm(text, stream=True))
        elif call == "chat":
            llm.chat(messages, chat_format="chatml")
        elif call == "chat completion":
            llm.create_chat_completion(messages, chat_format="chatml")
        elif call == "embed":
            llm.embed(text)
        else:
            llm.eval(llm.tokenize(text))
    assert forward_calls == [] and llm.tokens == [5, 6, 7]   # nothing evaluated, nothing lost


def test_a_prompt_that_fills_the_context_leaves_no_room_and_is_refused(llm, forward_calls):
    text = " ".join(["e"] * 31)
    assert len(llm.tokenize(text)) == 32
    with pytest.raises(ContextOverflowError, match="the prompt has 32 tokens; the context length is 32"):
        llm(text)
    assert forward_calls == []


@pytest.fixture
def never_ending(llm, monkeypatch):
    """The model never produces an end-of-generation token."""
    monkeypatch.setattr(llm.tokenizer, "is_eog", lambda token: False)
    return llm


def test_huge_max_new_tokens_stops_at_the_context(never_ending):
    llm = never_ending
    prompt = llm.tokenize("hello")
    generated = list(llm.generate(prompt, temperature=0))
    assert len(llm.tokens) == 32 and len(generated) == 32 - len(prompt) + 1
    text = llm("hello", max_new_tokens=10**12, temperature=0)
    assert len(llm.tokens) == 32 and llm.tokenize(text, add_bos_token=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=10**12,
                                       chat_format="{{ messages[0].content }}")
    # every generated token counts; the last one is sampled when the window is full, never evaluated
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["total_tokens"] == 32 + 1


def test_negative_or_missing_max_new_tokens_means_until_the_context_is_full(never_ending):
    for limit in (-1, None):
        chunks = list(never_ending.completion_stream(never_ending.tokenize("hi"), max_new_tokens=limit, temperature=0))
        assert chunks[-1][1] == "length" and len(never_ending.tokens) == 32


def test_max_new_tokens_is_honoured_exactly(never_ending):
    stream = never_ending.completion_stream(never_ending.tokenize("hi"), max_new_tokens=5, temperature=0)
    assert list(stream)[-1][1] == "length"
    assert len(never_ending.tokens) == len(never_ending.tokenize("hi")) + 4   # the 5th is sampled, not evaluated


# ---- prompts too long to tokenize -----------------------------------------------------------------

@pytest.mark.parametrize("call", ["complete", "chat", "embed"])
def test_a_megabyte_prompt_is_refused_without_tokenizing_it(llm, monkeypatch, call):
    """Tokenizing costs about a microsecond and a hundred bytes per character: a 10 MB prompt for a
    32-token context is refused by its length alone."""
    encoded = []
    real = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text, **kw: encoded.append(len(text)) or real(text, **kw))
    text = "word " * 2_000_000
    with pytest.raises(ContextOverflowError, match=r"10,000,\d+ characters, so it cannot fit the context of 32"):
        if call == "complete":
            llm(text)
        elif call == "chat":
            llm.chat([{"role": "user", "content": text}], chat_format="chatml")
        else:
            llm.embed(text)
    assert encoded == []


TEXT = st.text(st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["<|im_start|>user\nhi<|im_end|>", "   \t\n\n", "😀" * 20, "a" * 500, "<s></s><unk>", "\u2581" * 30])


@pytest.fixture(scope="module")
def tokenizers(small_path, smollm2_path):
    from zephyr import Tokenizer
    return [Tokenizer.from_gguf(small_path), Tokenizer.from_gguf(smollm2_path)]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(text=TEXT, special=st.booleans())
def test_no_token_covers_more_characters_than_max_token_chars(tokenizers, text, special):
    """The bound the length check relies on: len(text) <= tokens * max_token_chars, so it never
    refuses a prompt that would fit."""
    for tokenizer in tokenizers:
        ids = tokenizer.encode(text, add_bos=False, special=special)
        assert len(text) <= len(ids) * tokenizer.max_token_chars
