"""Concurrency and lifecycle: threads, abandoned and interleaved streams, interrupts, and close().

One model may be used from several threads (calls are serialised), a stream may stop at any point,
a KeyboardInterrupt may land anywhere in generation, and close() gives the memory back: after each,
the model answers exactly as before, or says clearly that it is closed.
"""
import json
import subprocess
import sys
import textwrap
import threading
from dataclasses import replace

import numpy as np
import pytest

from zephyr import AutoModelForCausalLM, ZephyrError
from zephyr.testing.gguf_writer import TensorSpec, write_gguf
from zephyr.quants import GGMLType
from zephyr.testing.synthetic import PRESETS, ModelShape, llama_metadata, llama_tensors, minimal_llama_vocab, write_llama_model

SMALL = replace(PRESETS["tiny"], vocab_size=300)
PROMPTS = ["one", "two three four"]
MESSAGES = [{"role": "user", "content": "hello"}]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    return write_llama_model(tmp_path_factory.mktemp("life") / "small.gguf", SMALL, "Q4_K_M")


@pytest.fixture
def llm(small_path):
    # One OpenMP thread: on a shared, busy machine a second one mostly waits at barriers.
    with AutoModelForCausalLM.from_pretrained(str(small_path), context_length=128, threads=1) as loaded:
        yield loaded


def work(llm, kind, prompt):
    """One call of each public kind, deterministic (seeded or greedy)."""
    if kind == "complete":
        return llm(prompt, max_new_tokens=6, temperature=0.7, seed=5)
    if kind == "stream":
        return "".join(llm(prompt, max_new_tokens=6, temperature=0, stream=True))
    if kind == "chat":
        return llm.chat([{"role": "user", "content": prompt}], chat_format=TEMPLATE, max_new_tokens=5, temperature=0)
    if kind == "completion":
        reply = llm.create_chat_completion([{"role": "user", "content": prompt}], chat_format=TEMPLATE, max_tokens=5,
                                           temperature=0.9, seed=3)
        return reply["choices"][0]["message"]["content"]
    if kind == "embed":
        return np.round(llm.embed(prompt), 5).tolist()
    return llm.tokenize(prompt)


KINDS = ["complete", "stream", "chat", "completion", "embed", "tokenize"]


# ---- threads ----------------------------------------------------------------------------------------

def test_threads_sharing_one_model_get_the_sequential_results(small_path):
    llm = AutoModelForCausalLM.from_pretrained(str(small_path), context_length=128, threads=2)
    jobs = [(kind, prompt) for kind in KINDS for prompt in PROMPTS]
    expected = {job: work(llm, *job) for job in jobs}
    results, errors = {}, []

    def run(chunk):
        try:
            for _ in range(2):
                for job in chunk:
                    results.setdefault(job, []).append(work(llm, *job))
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert results == {job: [value, value] for job, value in expected.items()}
    llm.close()


def test_close_from_another_thread_waits_for_the_call_in_progress(small_path):
    llm = AutoModelForCausalLM.from_pretrained(str(small_path), context_length=128, threads=1)
    expected = llm("hello", max_new_tokens=20, temperature=0)
    started, result = threading.Event(), []

    def generate():
        for chunk in llm("hello", max_new_tokens=20, temperature=0, stream=True):
            started.set()
            result.append(chunk)

    worker = threading.Thread(target=generate)
    worker.start()
    started.wait(30)
    llm.close()                       # blocks until the stream has finished
    worker.join(30)
    assert "".join(result) == expected
    with pytest.raises(ZephyrError, match="has been closed"):
        llm("hello")


# ---- streams ----------------------------------------------------------------------------------------

def test_abandoned_streams_leave_the_model_usable(llm):
    expected = llm("hello there", max_new_tokens=8, temperature=0)
    for stop_after in (0, 1, 3):
        stream = llm("something else", max_new_tokens=50, temperature=0, stream=True)
        for _ in range(stop_after):
            next(stream)
        del stream                    # dropped without close(): the generator is finalised
        assert llm("hello there", max_new_tokens=8, temperature=0) == expected
    chunks = llm.create_chat_completion(MESSAGES, chat_format=TEMPLATE, max_tokens=30, stream=True)
    next(chunks)
    chunks.close()
    assert llm("hello there", max_new_tokens=8, temperature=0) == expected


def test_interleaved_streams_in_one_thread_fail_loudly_instead_of_mixing(llm):
    alone = llm("alpha", max_new_tokens=10, temperature=0)
    other = llm("beta gamma", max_new_tokens=5, temperature=0)
    paused = llm("alpha", max_new_tokens=10, temperature=0, stream=True)
    next(paused)
    assert llm("beta gamma", max_new_tokens=5, temperature=0) == other    # the newer call is right
    with pytest.raises(ZephyrError, match="another call used the model while this generation was paused"):
        list(paused)
    assert llm("alpha", max_new_tokens=10, temperature=0) == alone


# ---- interrupts -------------------------------------------------------------------------------------

def test_keyboard_interrupt_from_a_stream_consumer(llm):
    expected = llm("hello there", max_new_tokens=8, temperature=0)
    with pytest.raises(KeyboardInterrupt):
        for i, _chunk in enumerate(llm("a long story", max_new_tokens=100, temperature=0, stream=True)):
            if i == 3:
                raise KeyboardInterrupt
    assert llm("hello there", max_new_tokens=8, temperature=0) == expected
    released = threading.Thread(target=lambda: llm("x", max_new_tokens=1))   # the lock is free
    released.start()
    released.join(30)
    assert not released.is_alive()


@pytest.mark.parametrize("at_call", [1, 2, 5])
def test_keyboard_interrupt_inside_the_forward_pass(llm, monkeypatch, at_call):
    """As if Ctrl-C landed while a batch was evaluated: the context keeps only whole batches."""
    expected = llm("hello there", max_new_tokens=8, temperature=0)
    real, calls = llm.model.forward, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", interrupted)
    prompt = "a much longer prompt that takes several batches to evaluate"
    with pytest.raises(KeyboardInterrupt):
        llm(prompt, max_new_tokens=20, batch_size=4)
    tokens = llm.tokenize(prompt)
    assert llm.tokens == tokens[:len(llm.tokens)] or len(calls) > len(tokens) // 4 + 1   # a prefix, or generating
    monkeypatch.setattr(llm.model, "forward", real)
    assert llm("hello there", max_new_tokens=8, temperature=0) == expected


def test_sigint_during_generation(small_path):
    """A real SIGINT (Ctrl-C) at a random moment of a long generation, in a child process."""
    script = textwrap.dedent(f"""
        import json, os, signal, threading
        from zephyr import AutoModelForCausalLM
        llm = AutoModelForCausalLM.from_pretrained({str(small_path)!r}, context_length=512, threads=1)
        llm.is_eos_token = lambda token: False
        expected = llm("hello there", max_new_tokens=12, temperature=0)
        outcomes = []
        for delay in (0.05, 0.3):
            threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
            try:
                while True:   # each call fills the context; repeat until the signal lands in one
                    llm("tell me a story", max_new_tokens=10**6, temperature=0.8, seed=1)
            except KeyboardInterrupt:
                outcomes.append(len(llm.tokens))
            outcomes.append(llm("hello there", max_new_tokens=12, temperature=0) == expected)
        print(json.dumps(outcomes))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes[1::2] == [True, True], outcomes
    assert all(isinstance(o, int) and not isinstance(o, bool) for o in outcomes[0::2]), outcomes


# ---- close() and memory -----------------------------------------------------------------------------

def test_closed_model_says_so(small_path):
    llm = AutoModelForCausalLM.from_pretrained(str(small_path))
    llm.close()
    for call in (lambda: llm("hi"), lambda: llm.eval([1]), lambda: llm.embed("hi"), lambda: llm.chat(MESSAGES),
                 lambda: llm.create_chat_completion(MESSAGES), lambda: list(llm.generate([1, 2]))):
        with pytest.raises(ZephyrError, match="small.gguf has been closed"):
            call()
    assert "closed" in repr(llm)
    llm.close()   # twice is fine


BIG = ModelShape(n_layers=4, d_model=1024, n_heads=8, n_kv_heads=8, d_ffn=4096, vocab_size=300, context_length=256)

RSS_SCRIPT = """
import gc, json, os, sys
from zephyr import AutoModelForCausalLM

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def mapped(path):
    with open("/proc/self/maps") as f:
        return path in f.read()

big, small = sys.argv[1], sys.argv[2]
before = rss()
llm = AutoModelForCausalLM.from_pretrained(big, context_length=64, threads=1)
llm("hi", max_new_tokens=2, temperature=0)          # every weight read through the map
loaded = rss()
llm.close()
closed = rss()
still_mapped = mapped(big)
cycles = []
for i in range(50):
    with AutoModelForCausalLM.from_pretrained(small, context_length=64, threads=1) as cycle:
        cycle("hi", max_new_tokens=2, temperature=0)
    if i in (9, 49):
        gc.collect()
        cycles.append(rss())
print(json.dumps({"before": before, "loaded": loaded, "closed": closed, "still_mapped": still_mapped or mapped(small),
                  "cycles": cycles}))
"""


def test_close_gives_the_memory_back_and_load_cycles_do_not_leak(tmp_path, small_path):
    big = tmp_path / "big-f32.gguf"
    specs = [TensorSpec(s.name, GGMLType.F32, s.shape, np.full(s.shape, 0.01, np.float32))
             for s in llama_tensors(BIG, "F32")]
    write_gguf(big, llama_metadata(BIG, minimal_llama_vocab(BIG.vocab_size), "big", "F32"), specs)
    weights = sum(s.nbytes for s in specs)
    assert weights > 250 << 20
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(big), str(small_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    mib = {k: round(v / 2**20) for k, v in m.items() if isinstance(v, int)}
    assert m["loaded"] - m["before"] > 0.9 * weights, mib            # the weights were read, through the map
    assert m["loaded"] - m["closed"] > 0.9 * weights, mib            # ... and given back by close()
    assert not m["still_mapped"]
    growth = m["cycles"][1] - m["cycles"][0]
    assert growth < 20 << 20, f"40 load/close cycles grew RSS by {growth / 2**20:.1f} MiB"
