"""The HTTP server against hostile clients: loopback by default, constant-time API keys, malformed
requests answered with OpenAI-style 400s (never a 500 or a traceback), bounded requests, and a
load test of concurrent streaming clients on loopback."""
import asyncio
import contextlib
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_server import free_port, live_server  # noqa: E402

from zephyr import AutoModelForCausalLM  # noqa: E402
from zephyr.testing.synthetic import PRESETS, write_llama_model  # noqa: E402

TIMEOUT = 120
SMALL = replace(PRESETS["tiny"], vocab_size=300)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def small_path(tmp_path_factory):
    return str(write_llama_model(tmp_path_factory.mktemp("hardening") / "small.gguf", SMALL, "Q4_K_M"))


@pytest.fixture(scope="module")
def small_llm(small_path):
    with AutoModelForCausalLM.from_pretrained(small_path, context_length=256, threads=1) as llm:
        yield llm


@pytest.fixture(scope="module")
def url(small_llm):
    with live_server(small_llm, api_key="sk-secret") as base:
        yield base


KEY = {"Authorization": "Bearer sk-secret"}


def post(url, path, **kwargs):
    headers = {**KEY, **kwargs.pop("headers", {})}
    return httpx.post(url + path, headers=headers, timeout=TIMEOUT, **kwargs)


def assert_openai_error(response, status=400):
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


# ---- where it listens, who may talk to it ---------------------------------------------------------

def test_binds_loopback_by_default(monkeypatch, small_llm, small_path):
    import zephyr.server
    from zephyr.cli import main

    assert inspect.signature(zephyr.server.serve).parameters["host"].default == "127.0.0.1"
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(uvicorn_host=host))
    zephyr.server.serve(small_llm)
    monkeypatch.setattr(zephyr.server, "serve", lambda llm, host, **kw: seen.update(cli_host=host))
    assert main(["serve", small_path]) in (0, None)
    assert seen == {"uvicorn_host": "127.0.0.1", "cli_host": "127.0.0.1"}


def test_the_api_key_is_compared_in_constant_time(url, monkeypatch):
    import zephyr.server.app as app

    compared = []
    real = app.secrets.compare_digest
    monkeypatch.setattr(app.secrets, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    for headers in ({"Authorization": "Bearer sk-secreT"}, {"Authorization": "Bearer sk-secret-and-more"},
                    {"Authorization": "Basic sk-secret"}, {"Authorization": "sk-secret"}, {"X-API-Key": "sk-secret"},
                    {"Authorization": "Bearer " + "x" * 100_000}, {"Authorization": "Bearer s\u00e9cret".encode()}, {}):
        response = httpx.get(url + "/v1/models", headers=headers, timeout=TIMEOUT)
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models?api_key=sk-secret", timeout=TIMEOUT).status_code == 401
    assert httpx.get(url + "/v1/models", headers=KEY, timeout=TIMEOUT).status_code == 200
    assert (b"sk-secret", b"sk-secret") in compared and (b"sk-secreT", b"sk-secret") in compared


# ---- malformed requests -----------------------------------------------------------------------------

J = {"Content-Type": "application/json"}
MALFORMED = {
    "not JSON": dict(content=b"{not json", headers=J),
    "truncated JSON": dict(content=b'{"messages": [{"role": "user", "content": "hi"', headers=J),
    "invalid UTF-8": dict(content=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', headers=J),
    "100,000 nested arrays": dict(content=b"[" * 100_000 + b"]" * 100_000, headers=J),
    "nested objects in a field": dict(content=b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=J),
    "NaN temperature": dict(content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                            headers=J),
    "Infinity top_p": dict(content=b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
                           headers=J),
    "a JSON array": dict(json=[1, 2]),
    "a JSON string": dict(json="hello"),
    "null": dict(json=None),
    "JSON sent as text/plain": dict(content=json.dumps({"messages": HI}), headers={"Content-Type": "text/plain"}),
    "messages not a list": dict(json={"messages": "hi"}),
    "a message without role": dict(json={"messages": [{"content": "hi"}]}),
    "content an object": dict(json={"messages": [{"role": "user", "content": {"a": 1}}]}),
    "content parts of the wrong type": dict(json={"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    "max_tokens 0": dict(json={"messages": HI, "max_tokens": 0}),
    "max_tokens -1": dict(json={"messages": HI, "max_tokens": -1}),
    "max_tokens a string": dict(json={"messages": HI, "max_tokens": "many"}),
    "max_tokens a float": dict(json={"messages": HI, "max_tokens": 1.5}),
    "temperature a string": dict(json={"messages": HI, "temperature": "hot"}),
    "negative top_k": dict(json={"messages": HI, "top_k": -1}),
    "stop of numbers": dict(json={"messages": HI, "stop": [1, 2]}),
    "a lone surrogate": dict(content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}', headers=J),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_chat_requests_get_a_400(url, case):
    assert_openai_error(post(url, "/v1/chat/completions", **MALFORMED[case]))


@pytest.mark.parametrize("body", [
    {"prompt": [1.5, 2]}, {"prompt": [-1]}, {"prompt": [2**40]}, {"prompt": ""}, {"prompt": []}, {"prompt": None},
    {"prompt": {"text": "hi"}}, {"prompt": "hi", "max_tokens": -5}, {"prompt": "hi", "stop": [None]},
])
def test_malformed_completion_requests_get_a_400(url, body):
    assert_openai_error(post(url, "/v1/completions", json=body))


def test_a_lone_surrogate_in_a_completion_prompt_gets_a_400(url):
    assert_openai_error(post(url, "/v1/completions", content=b'{"prompt": "\\ud800"}', headers=J))


@pytest.mark.parametrize("extreme", [{"seed": 2**80}, {"seed": -(2**80)}, {"top_k": 2**80}, {"min_p": 1.0},
                                     {"temperature": 0}, {"temperature": 1e-320}, {"top_p": 1e-300},
                                     {"repeat_penalty": 1e300}, {"repeat_penalty": 1e-300},
                                     {"stop": ["x" * 100_000]}, {"stop": ""}, {"max_tokens": 2**80}])
def test_extreme_but_valid_values_are_served(url, small_llm, extreme):
    response = post(url, "/v1/chat/completions", json={"messages": HI, "max_tokens": 4, **extreme})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["total_tokens"] <= small_llm.context_length + 1


def test_huge_max_tokens_stops_at_the_context(url, small_llm, monkeypatch):
    monkeypatch.setattr(small_llm.tokenizer, "is_eog", lambda token: False)
    reply = post(url, "/v1/chat/completions", json={"messages": HI, "max_tokens": 10**12, "temperature": 0}).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["total_tokens"] == small_llm.context_length + 1   # the last token is sampled, not evaluated


def test_a_chat_prompt_megabytes_long_is_refused_at_once(url):
    started = time.monotonic()
    body = {"messages": [{"role": "user", "content": "word " * 1_000_000}], "max_tokens": 2}
    assert assert_openai_error(post(url, "/v1/chat/completions", json=body))["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 5


def test_a_completion_prompt_megabytes_long_is_refused_at_once(url):
    started = time.monotonic()
    response = post(url, "/v1/completions", json={"prompt": "word " * 200_000, "max_tokens": 2})
    assert assert_openai_error(response)["code"] == "context_length_exceeded"
    assert time.monotonic() - started < 1


def test_an_oversized_body_is_refused_before_it_is_read(url):
    body = json.dumps({"messages": HI, "max_tokens": 1, "padding": "x" * (64 << 20)})
    response = post(url, "/v1/chat/completions", content=body, headers=J)
    assert response.status_code == 413
    assert_openai_error(response, 413)


# ---- load ------------------------------------------------------------------------------------------

SERVER_SCRIPT = """
import sys
from zephyr import AutoModelForCausalLM
from zephyr.server import serve
llm = AutoModelForCausalLM.from_pretrained(sys.argv[1], context_length=256, threads=1)
serve(llm, port=int(sys.argv[2]), log_level="warning", max_queue=64)
"""

CLIENTS, ROUNDS = 32, 8
PROMPTS = [f"story number {i}" for i in range(CLIENTS)]


def server_rss(pid) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def server_process(model_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, model_path, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.1)
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(15)


async def stream_chat(client, base, prompt):
    """One streamed chat completion: (text, finish reason, saw [DONE], ids seen)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0, "stream": True}
    text, finish, done, ids = [], None, False, set()
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done, line
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, done, ids


def test_32_concurrent_streaming_clients(small_path, security_tally):
    async def run(base, pid):
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
            expected = {p: await stream_chat(client, base, p) for p in PROMPTS}
            rss_warm = server_rss(pid)

            async def client_loop(i):
                results = []
                for round_ in range(ROUNDS):
                    prompt = PROMPTS[(i + round_) % CLIENTS]
                    results.append((prompt, await stream_chat(client, base, prompt)))
                return results

            started = time.monotonic()
            outcomes = await asyncio.gather(*(client_loop(i) for i in range(CLIENTS)), return_exceptions=True)
            elapsed = time.monotonic() - started
            return expected, outcomes, rss_warm, server_rss(pid), elapsed

    with server_process(small_path) as (base, pid):
        expected, outcomes, rss_warm, rss_after, elapsed = asyncio.run(run(base, pid))
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, errors[:3]
    results = [r for client in outcomes for r in client]
    assert len(results) == CLIENTS * ROUNDS
    for prompt, (text, finish, done, ids) in results:
        assert done and finish in ("stop", "length") and len(ids) == 1, (prompt, finish, done, ids)
        assert text == expected[prompt][0], f"{prompt!r}: a stream got another's text"   # complete and unmixed
    growth = rss_after - rss_warm
    assert growth < 30 << 20, f"the server grew by {growth / 2**20:.1f} MiB over {len(results)} requests"
    security_tally["HTTP streaming requests under load (32 clients)"] = len(results)
    security_tally["... seconds, server RSS growth MiB"] = f"{elapsed:.1f}, {growth / 2**20:.1f}"


def test_too_many_embedding_inputs_are_refused(url):
    response = post(url, "/v1/embeddings", json={"input": ["x"] * 257})
    assert assert_openai_error(response)["message"]
