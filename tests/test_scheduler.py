"""Continuous batching (zephyr/scheduler.py) on the demo model: concurrent answers equal solo ones,
prefixes are reused across requests (in the cache's sequences and in RAM), n answers share their
prompt, cancelled requests free their sequence, and one request's failure leaves the others."""
import numpy as np
import pytest

from zephyr import AutoModelForCausalLM, ContextOverflowError
from zephyr.generation import Generation
from zephyr.scheduler import EmbeddingRequest, Request, Scheduler, SchedulerFullError
from zephyr.testing.compare import greedy_flip_is_a_near_tie

PROMPTS = ["The capital of France is", "One, two, three, four,", "def fibonacci(n):",
           "The best way to learn a language is", "Water boils at", "My favourite season is"]


class Recording(Generation):
    """A Generation that keeps the logits of every step it takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, logits):
        self.seen.append(np.array(logits))
        return super().step(logits)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=4, context_length=1024) as loaded:
        yield loaded


@pytest.fixture
def counted(llm, monkeypatch):
    """Tokens the model evaluates, pass by pass, from an empty sequence 0 (what earlier tests left there
    would be reused)."""
    llm.reset()
    passes = []
    real = llm.model.forward

    def forward(tokens, batch, rows=None):
        passes.append(len(tokens))
        return real(tokens, batch, rows)
    monkeypatch.setattr(llm.model, "forward", forward)
    return passes


def answer(llm, prompt, max_new_tokens=20, **settings):
    tokens = llm.tokenize_prompt(prompt) if isinstance(prompt, str) else prompt
    settings = llm.settings(temperature=0, max_new_tokens=max_new_tokens, **settings)
    return Request(tokens, [Recording(llm.tokenizer, settings, tokens)])


def generated(request, choice=0):
    return request.generations[choice].tokens


def test_concurrent_answers_equal_solo_ones(llm):
    """Six greedy answers on four sequences (two wait for a free one) against each alone: the same
    tokens, or a first difference at a near-tie of the solo logits."""
    solo = [Scheduler(llm).run([answer(llm, p)])[0] for p in PROMPTS]
    together = Scheduler(llm).run([answer(llm, p) for p in PROMPTS])
    for alone, batched in zip(solo, together):
        assert alone.error is None and batched.error is None
        a, b = generated(alone), generated(batched)
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                assert greedy_flip_is_a_near_tie(batched.generations[0].seen[step], alone.generations[0].seen[step])
                break
        else:
            assert a == b
        assert len(a) == 20 or alone.generations[0].finish_reason == "stop"


def test_generate_batch_matches_single_calls(llm):
    texts = llm.generate_batch(PROMPTS[:3], max_new_tokens=12, temperature=0)
    assert len(texts) == 3 and all(texts)
    assert texts[0] == llm(PROMPTS[0], max_new_tokens=12, temperature=0)


def test_one_pass_serves_every_running_answer(llm, counted):
    """Four answers decode in one pass per token: passes after the prompts hold four tokens."""
    Scheduler(llm).run([answer(llm, p, max_new_tokens=8) for p in PROMPTS[:4]])
    assert counted[0] == sum(len(llm.tokenize_prompt(p)) for p in PROMPTS[:4])   # all prompts in one pass
    assert 4 in counted[1:] and max(counted[1:]) == 4


def test_a_long_prompt_is_read_in_chunks_under_the_budget(llm, counted):
    long = llm.tokenize_prompt("word " * 600)
    scheduler = Scheduler(llm, token_budget=128)
    scheduler.run([answer(llm, PROMPTS[0], max_new_tokens=30), answer(llm, long, max_new_tokens=2)])
    assert max(counted) <= 128 and len(counted) >= len(long) // 128


def test_a_returning_conversation_reuses_its_prefix(llm, counted):
    """Conversation A, then B, then A's next turn: the third evaluates only what is new."""
    scheduler = Scheduler(llm)
    a = llm.tokenize_prompt("Tell me a long story about a lighthouse keeper. " * 12)
    b = llm.tokenize_prompt("Explain how bread rises, in detail. " * 12)
    first = scheduler.run([answer(llm, a, max_new_tokens=4)])[0]
    scheduler.run([answer(llm, b, max_new_tokens=4)])
    counted.clear()
    next_turn = a + generated(first) + llm.tokenize_prompt(" And then?", add_bos_token=False)
    scheduler.run([answer(llm, next_turn, max_new_tokens=2)])
    assert counted[0] <= 8, f"{counted[0]} tokens evaluated for a prompt of {len(next_turn)}"


def test_the_same_prompt_again_is_not_evaluated_and_answers_the_same(llm, counted):
    """A repeated prompt takes the logits kept by the sequence that read it: only answer tokens are
    evaluated, and the answer is the same to the bit (its last token evaluated alone would round
    differently from the batch it was read in, and could flip a greedy pick)."""
    scheduler = Scheduler(llm)
    prompt = llm.tokenize_prompt("The capital of France is")
    first = scheduler.run([answer(llm, prompt, max_new_tokens=8)])[0]
    counted.clear()
    again = scheduler.run([answer(llm, prompt, max_new_tokens=8)])[0]
    assert sum(counted) == len(generated(again)) - 1
    np.testing.assert_array_equal(again.generations[0].seen[0], first.generations[0].seen[0])
    assert generated(again) == generated(first)


def test_a_prefix_held_by_a_busy_sequence_is_copied_not_evaluated(llm, counted):
    """Conversations that start alike (a system prompt) while the first still runs: the second
    copies the shared prefix's keys and values from the busy sequence, and answers as it would alone."""
    system = llm.tokenize_prompt("You are a helpful assistant who answers in full sentences. " * 4)
    question = llm.tokenize_prompt(" How do tides work?", add_bos_token=False)
    scheduler = Scheduler(llm)
    running = scheduler.submit(answer(llm, system + llm.tokenize_prompt(" Hi!", add_bos_token=False),
                                      max_new_tokens=40))
    scheduler.step()
    counted.clear()
    second = scheduler.submit(answer(llm, system + question, max_new_tokens=8))
    scheduler.step()
    assert counted[0] <= len(question) + 1, f"{counted[0]} tokens evaluated; the new part is {len(question)}"
    while scheduler.step():
        pass
    assert running.error is None and second.error is None
    cold = Scheduler(llm).run([answer(llm, system + question, max_new_tokens=8)])[0]
    a, b = generated(cold), generated(second)
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            assert greedy_flip_is_a_near_tie(second.generations[0].seen[step], cold.generations[0].seen[step])
            break
    else:
        assert a == b


def test_logits_kept_for_a_prompt_are_not_used_once_the_sequence_holds_other_tokens(smollm2_path):
    """A prompt read in part (cancelled) over a sequence that held another prompt of the same length:
    that prompt's kept logits must not answer the new one."""
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=256) as llm:
        scheduler = Scheduler(llm, token_budget=8)
        first = llm.tokenize_prompt("The capital of France is a city on the Seine, and")[:10]
        other = first[:2] + llm.tokenize_prompt(" water boils at a hundred degrees when the air is thin",
                                                add_bos_token=False)[:18]
        scheduler.run([answer(llm, first, max_new_tokens=1)])
        cut = scheduler.submit(answer(llm, other, max_new_tokens=1))
        scheduler.step()            # 8 of its tokens read after the 2 shared: the sequence holds 10 again
        cut.cancel()
        scheduler.step()
        again = scheduler.run([answer(llm, other[:10], max_new_tokens=1)])[0]
        cold = Scheduler(llm).run([answer(llm, other[:10], max_new_tokens=1)])[0]
        np.testing.assert_allclose(again.generations[0].seen[0], cold.generations[0].seen[0], atol=0.05)


def test_prefixes_lost_by_a_sequence_come_back_from_ram(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=512) as llm:
        passes = []
        real = llm.model.forward
        llm.model.forward = lambda tokens, batch, rows=None: passes.append(len(tokens)) or real(tokens, batch, rows)
        a = llm.tokenize_prompt("A conversation about lighthouses and the sea. " * 8)
        b = llm.tokenize_prompt("A different one, about bread and yeast. " * 8)
        kept = Scheduler(llm, cache_bytes=64 << 20)
        kept.run([answer(llm, a, max_new_tokens=2)])
        kept.run([answer(llm, b, max_new_tokens=2)])   # the only sequence now holds B; A is in RAM
        passes.clear()
        restored = kept.run([answer(llm, a + [42], max_new_tokens=2)])[0]
        assert passes[0] <= 2 and restored.error is None
        cold = answer(llm, a + [42], max_new_tokens=2)
        Scheduler(llm).run([answer(llm, b, max_new_tokens=1)])
        Scheduler(llm).run([cold])
        assert generated(cold) == generated(restored)


def test_n_answers_share_the_prompt(llm, counted):
    prompt = llm.tokenize_prompt("Name a colour:")
    settings = llm.settings(temperature=0.9, max_new_tokens=6)
    generations = [Generation(llm.tokenizer, llm.settings(temperature=0.9, max_new_tokens=6, seed=i), prompt)
                   for i in range(3)]
    request = Scheduler(llm).run([Request(prompt, generations)])[0]
    assert request.error is None and settings.seed < 0
    assert counted[0] == len(prompt) and max(counted[1:]) <= 3
    assert all(g.finished for g in generations)


def test_chat_completion_n_gives_n_choices(llm):
    reply = llm.create_chat_completion([{"role": "user", "content": "Say a number."}], n=3, temperature=1.0, seed=7,
                                       max_tokens=8)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"]["completion_tokens"] > 0 and all(c["finish_reason"] for c in reply["choices"])
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], n=2, max_tokens=4, stream=True))
    assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0, 1}


def test_more_answers_than_sequences_run_in_turn(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=256) as llm:
        reply = llm.create_completion("Once upon a time", n=3, max_tokens=6, temperature=0.8, seed=3)
        assert len(reply["choices"]) == 3 and all(c["finish_reason"] for c in reply["choices"])


def test_a_cancelled_request_frees_its_sequence(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=256) as llm:
        scheduler = Scheduler(llm)
        long, short = answer(llm, PROMPTS[0], max_new_tokens=200), answer(llm, PROMPTS[1], max_new_tokens=5)
        scheduler.submit(long)
        scheduler.submit(short)
        for _ in range(3):
            scheduler.step()
        assert not short.done.is_set()   # waiting for the only sequence
        long.cancel()
        while scheduler.step():
            pass
        assert long.done.is_set() and short.done.is_set() and short.error is None
        assert len(generated(long)) < 200 and len(generated(short)) == 5


def test_a_request_cancelled_while_waiting_ends_with_its_last_event(smollm2_path):
    """A client that leaves before its request runs: the request still ends (its last event, `done`),
    or whoever waits on it (the server's queue count) would wait forever."""
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=256) as llm:
        scheduler = Scheduler(llm)
        running, waiting = answer(llm, PROMPTS[0], max_new_tokens=5), answer(llm, PROMPTS[1], max_new_tokens=5)
        events = []
        waiting.on_event = events.append
        scheduler.submit(running)
        scheduler.submit(waiting)
        scheduler.step()
        waiting.cancel()
        scheduler.step()
        assert waiting.done.is_set() and [e.choice for e in events] == [None] and not generated(waiting)
        while scheduler.step():
            pass
        assert running.done.is_set() and len(generated(running)) == 5


def test_prompts_that_cannot_fit_are_refused_at_once(llm):
    with pytest.raises(ContextOverflowError, match="context length is 1024"):
        Scheduler(llm).submit(answer(llm, [1] * 1024))
    with pytest.raises(ValueError, match="load it with sequences=5"):
        Scheduler(llm).submit(Request([1, 2], [None] * 5))


def test_an_answer_that_fills_its_sequence_ends_with_length(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=2, context_length=40) as llm:
        request = Scheduler(llm).run([answer(llm, PROMPTS[0], max_new_tokens=100)])[0]
        assert request.generations[0].finish_reason == "length" and request.error is None
        # every position holds a token, and the last token chosen (at position 40) ends the answer
        assert len(llm.tokenize_prompt(PROMPTS[0])) + len(generated(request)) == 41


def test_a_full_queue_refuses(llm):
    scheduler = Scheduler(llm, max_waiting=2)
    scheduler.submit(answer(llm, PROMPTS[0]))
    scheduler.submit(answer(llm, PROMPTS[1]))
    with pytest.raises(SchedulerFullError, match="2 requests are already waiting"):
        scheduler.submit(answer(llm, PROMPTS[2]))


def test_one_failing_request_leaves_the_others(llm):
    class Failing(Generation):
        def step(self, logits):
            raise RuntimeError("this sampler broke")
    tokens = llm.tokenize_prompt(PROMPTS[0])
    bad = Request(tokens, [Failing(llm.tokenizer, llm.settings(temperature=0), tokens)])
    good = answer(llm, PROMPTS[1], max_new_tokens=6)
    Scheduler(llm).run([bad, good])
    assert isinstance(bad.error, RuntimeError) and good.error is None and len(generated(good)) == 6


def test_embeddings_run_in_a_free_sequence(llm):
    tokens = llm.tokenize_prompt("Embeddings of this sentence.")
    request = Scheduler(llm).run([EmbeddingRequest(tokens)])[0]
    assert request.error is None
    np.testing.assert_allclose(request.hidden.mean(axis=0), llm.embed(tokens), rtol=1e-4, atol=1e-5)


def test_the_single_sequence_api_keeps_working_around_a_scheduler(llm):
    first = llm(PROMPTS[0], max_new_tokens=6, temperature=0)
    llm.generate_batch(PROMPTS[1:3], max_new_tokens=4, temperature=0)
    assert llm(PROMPTS[0], max_new_tokens=6, temperature=0) == first
