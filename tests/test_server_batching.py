"""The server serving many clients at once (continuous batching, `zephyr serve --parallel N`), live on
127.0.0.1: streams interleave, n answers come back, a departed client frees its sequence, the queue
rule holds under 64 clients, and embeddings leave the conversations' caches alone."""
import asyncio
import contextlib
import os
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from zephyr import AutoModelForCausalLM  # noqa: E402
from zephyr.server import create_app  # noqa: E402
from zephyr.server.runner import Mailbox  # noqa: E402

from test_server import TIMEOUT, live_app  # noqa: E402


@contextlib.contextmanager
def serving(llm, **options):
    """(base URL, app) of `llm` served by uvicorn in a thread."""
    app = create_app(llm, **options)
    with live_app(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def parallel_llm(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=8, context_length=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def parallel(parallel_llm):
    with serving(parallel_llm, max_queue=24) as served:
        yield served


def chat(url, content, **fields):
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0, **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)


def test_two_streams_interleave(parallel):
    """A second stream's first token comes while the first is still streaming (one at a time, it
    would come only after the first had finished)."""
    url, _ = parallel
    times, started = {}, threading.Event()

    def stream(name, tokens):
        body = {"prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
            for line in response.iter_lines():
                if '"text":"' in line and '"text":""' not in line:
                    times.setdefault(name + " first", time.monotonic())
                    started.set()
            times[name + " last"] = time.monotonic()
    first = threading.Thread(target=stream, args=("A", 150))
    first.start()
    assert started.wait(TIMEOUT)
    stream("B", 4)
    first.join()
    assert times["B first"] < times["A last"], times


def test_n_answers_through_the_openai_client(parallel):
    url, _ = parallel
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "A colour?"}], n=3,
                                           max_tokens=6, temperature=1.0, seed=11)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2] and all(c.finish_reason for c in reply.choices)
    streamed = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], n=2,
                                              max_tokens=4, stream=True)
    assert {choice.index for chunk in streamed for choice in chunk.choices} == {0, 1}


def test_a_prompt_too_long_for_its_sequence_is_refused_at_once(parallel):
    url, _ = parallel
    start = time.monotonic()
    response = chat(url, "word " * 700)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert time.monotonic() - start < 10


def test_embeddings_leave_the_conversations_cache_alone(parallel):
    """A conversation, an embeddings request, then the conversation's next turn: that turn still
    finds its prefix in a sequence."""
    url, app = parallel
    question = "Describe the sea in one sentence. " * 6
    first = chat(url, question, max_tokens=4).json()["choices"][0]["message"]["content"]
    assert httpx.post(url + "/v1/embeddings", json={"input": ["an unrelated sentence"] * 3},
                      timeout=TIMEOUT).status_code == 200
    slots = app.state.runner.scheduler.slots
    prompt = parallel_prompt(app, question)
    assert any(s.tokens[:len(prompt)] == prompt for s in slots), "the conversation's prefix was wiped"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": first},
                {"role": "user", "content": "And the sky?"}]
    assert httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                      timeout=TIMEOUT).status_code == 200


def parallel_prompt(app, question):
    llm = app.state.runner.llm
    return llm.chat_prompt([{"role": "user", "content": question}])[0]


def test_a_departed_client_frees_its_sequence(smollm2_path):
    """One sequence: a client streaming a long answer leaves; the next request starts promptly."""
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=512) as llm, \
            serving(llm) as (url, app):
        body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 400,
                "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    break
        start = time.monotonic()
        assert chat(url, "Hi", max_tokens=3).status_code == 200
        assert time.monotonic() - start < 30
        assert app.state.runner.pending == 0


def test_a_client_leaving_while_queued_frees_its_place(smollm2_path):
    """One sequence, busy: a second client's request waits for it, and the client leaves; the
    queue forgets the request (else each such client would hold a place until the queue is full)."""
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path), sequences=1, context_length=512) as llm, \
            serving(llm) as (url, app):
        body = {"messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 450,
                "stream": True, "temperature": 0, "logit_bias": {"2": -100}}   # no end before max_tokens
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as running:
            lines = running.iter_lines()
            next(line for line in lines if '"content"' in line)
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT):
                deadline = time.monotonic() + 30
                while app.state.runner.pending < 2:
                    assert time.monotonic() < deadline, "the second request never reached the queue"
                    time.sleep(0.02)
            assert next(line for line in lines if '"content"' in line)   # the first still runs: the second waited
        deadline = time.monotonic() + 30
        while app.state.runner.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert app.state.runner.pending == 0


def test_sixty_four_clients_are_answered_or_refused_by_the_queue_rule(parallel):
    """64 clients against 8 sequences and a queue of 24: each gets 200 or 503, none stalls, and the
    server's memory stays bounded."""
    url, _ = parallel
    rss_before = _rss_mib()

    async def one(client, i):
        response = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8, "temperature": 0})
        return response.status_code

    async def crowd():
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
    statuses = asyncio.run(crowd())
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 24, statuses
    assert _rss_mib() - rss_before < 200
    assert chat(url, "Still there?", max_tokens=2).status_code == 200


def _rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_a_burst_of_events_from_another_thread_is_one_wake_up_in_order():
    """The scheduler's tokens for every stream of a step reach the event loop in one wake-up, each
    stream's in the order posted; after the loop closes, posting raises (the stream cancels)."""
    async def scenario():
        mailbox = Mailbox(asyncio.get_running_loop())
        wake_ups = []
        deliver = mailbox._deliver
        mailbox._deliver = lambda: (wake_ups.append(1), deliver())
        queues = [asyncio.Queue() for _ in range(8)]
        poster = threading.Thread(target=lambda: [mailbox.post(q, (i, n))
                                                  for n in range(3) for i, q in enumerate(queues)])
        poster.start()
        poster.join()   # the loop is blocked meanwhile: every post lands before any delivery
        got = [[await q.get() for _ in range(3)] for q in queues]
        assert got == [[(i, n) for n in range(3)] for i in range(8)]
        assert len(wake_ups) == 1
        return mailbox

    loop = asyncio.new_event_loop()
    mailbox = loop.run_until_complete(scenario())
    loop.close()
    with pytest.raises(RuntimeError):
        mailbox.post(asyncio.Queue(), "late")
