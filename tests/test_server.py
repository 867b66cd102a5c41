"""The OpenAI-compatible server, live on 127.0.0.1: the official `openai` client, SSE streaming,
errors in OpenAI's shape, one generation at a time, and clients that leave mid-stream."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

from zephyr import AutoModelForCausalLM  # noqa: E402
from zephyr.server import create_app  # noqa: E402
from zephyr.testing.processes import free_port, interrupt  # noqa: E402
from zephyr.testing.synthetic import write_llama_model  # noqa: E402

TIMEOUT = 120   # seconds any one request may take on a busy 2-core machine


@contextlib.contextmanager
def live_server(llm, **options):
    """Serve `llm` with uvicorn on a free loopback port in a thread; yield the base URL; stop."""
    with live_app(create_app(llm, **options)) as url:
        yield url


@contextlib.contextmanager
def live_app(app):
    """Serve the ASGI `app` with uvicorn on a free loopback port in a thread; yield the base URL; stop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def demo_url(smollm2_path):
    with AutoModelForCausalLM.from_pretrained(str(smollm2_path)) as llm, live_server(llm, api_key="sk-test") as url:
        yield url


@pytest.fixture(scope="module")
def client(demo_url):
    return openai.OpenAI(base_url=demo_url + "/v1", api_key="sk-test", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(write_llama_model(tmp_path_factory.mktemp("server") / "tiny.gguf", "tiny", "Q4_0"))


@pytest.fixture(scope="module")
def tiny_llm(tiny_path):
    with AutoModelForCausalLM.from_pretrained(tiny_path) as llm:
        yield llm


@pytest.fixture(scope="module")
def tiny_url(tiny_llm):
    with live_server(tiny_llm, max_queue=8) as url:
        yield url


@pytest.fixture
def slow_forward(tiny_llm, monkeypatch):
    """Make every forward pass of the tiny model take at least 20 ms, so generations last."""
    forward = tiny_llm.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)
    monkeypatch.setattr(tiny_llm.model, "forward", slow)


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
THIS_PROCESS = f"{socket.gethostname()}:{os.getpid()}"   # the system_fingerprint of the servers started here


# -- the official openai client --------------------------------------------------------------------
def test_chat_with_the_openai_client_streamed_equals_whole(client):
    whole = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=16)
    text = whole.choices[0].message.content
    assert "Paris" in text and whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 10 and 0 < whole.usage.completion_tokens <= 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    # the process that answered (here, this one) names itself on every response and chunk
    assert {c.system_fingerprint for c in chunks} == {whole.system_fingerprint} == {THIS_PROCESS}


def test_completion_with_the_openai_client_streamed_equals_whole(client):
    whole = client.completions.create(model="demo", prompt="The capital of France is", temperature=0, max_tokens=6)
    text = whole.choices[0].text
    assert "Paris" in text and whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    streamed = list(client.completions.create(model="demo", prompt="The capital of France is", temperature=0,
                                              max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert {c.system_fingerprint for c in streamed} == {whole.system_fingerprint} == {THIS_PROCESS}


def test_stop_strings_and_seeds(client):
    stopped = client.completions.create(model="demo", prompt="The capital of France is", temperature=0,
                                        max_tokens=6, stop=["Paris"])
    assert "Paris" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    draws = [client.completions.create(model="demo", prompt="Once upon a time", max_tokens=5, seed=7,
                                       temperature=1.0).choices[0].text for _ in range(2)]
    assert draws[0] == draws[1]


def test_models_health_and_embeddings(client, demo_url, smollm2_path):
    assert [m.id for m in client.models.list()] == [smollm2_path.name]
    assert client.models.retrieve(smollm2_path.name).id == smollm2_path.name
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.code == "model_not_found"
    health = httpx.get(demo_url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["system_fingerprint"] == THIS_PROCESS
    result = client.embeddings.create(model="demo", input=["Paris", "a longer sentence about cats"])  # base64
    assert [d.index for d in result.data] == [0, 1] and len(result.data[0].embedding) == 576
    assert result.usage.prompt_tokens >= 3
    as_floats = httpx.post(demo_url + "/v1/embeddings", json={"input": "Paris", "encoding_format": "float"},
                           headers={"Authorization": "Bearer sk-test"}, timeout=TIMEOUT).json()
    assert as_floats["data"][0]["embedding"] == pytest.approx(result.data[0].embedding, abs=1e-6)


def test_a_wrong_api_key_is_refused(demo_url):
    bad = openai.OpenAI(base_url=demo_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.models.list()
    assert refused.value.code == "invalid_api_key"
    response = httpx.get(demo_url + "/v1/models", timeout=TIMEOUT)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(demo_url + "/health", timeout=TIMEOUT).status_code == 200   # no key needed
    assert "<title>zephyr chat</title>" in httpx.get(demo_url + "/", timeout=TIMEOUT).text


# -- structured output, tools, logprobs, logit_bias ------------------------------------------------
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "hobbies"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


def test_json_schema_with_the_openai_client(client):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    whole = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=150,
                                           response_format=response_format)
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=150,
                                            response_format=response_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_the_openai_clients_parse_helper_with_a_pydantic_model(client):
    pytest.importorskip("llguidance")
    from pydantic import BaseModel

    class Capital(BaseModel):
        country: str
        city: str

    parsed = client.chat.completions.parse(model="demo", temperature=0, max_tokens=60, response_format=Capital,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert isinstance(parsed.choices[0].message.parsed, Capital)


def test_tool_calls_with_the_openai_client_streamed_and_assembled(client):
    pytest.importorskip("llguidance")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model="demo", messages=WEATHER_QUESTION, temperature=0, max_tokens=60,
                                           tools=[WEATHER], tool_choice=choice)
    assert whole.choices[0].finish_reason == "tool_calls"
    [call] = whole.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    with client.chat.completions.stream(model="demo", messages=WEATHER_QUESTION, temperature=0, max_tokens=60,
                                        tools=[WEATHER], tool_choice=choice) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    # the call and its result go back into the conversation
    history = WEATHER_QUESTION + [whole.choices[0].message.model_dump(exclude_none=True),
                                  {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    answer = client.chat.completions.create(model="demo", messages=history, temperature=0, max_tokens=20,
                                            tools=[WEATHER])
    assert answer.choices[0].message.content


def test_logprobs_logit_bias_and_penalties_with_the_openai_client(client):
    whole = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.bytes and t.logprob <= 0 for t in content)
    first = content[0]
    banned = client.chat.completions.create(model="demo", messages=QUESTION, temperature=0, max_tokens=6,
                                            logit_bias={str(first_id(client, first.token)): -100})
    assert not banned.choices[0].message.content.startswith(first.token)
    completion = client.completions.create(model="demo", prompt="The capital of France is", temperature=0,
                                           max_tokens=3, logprobs=2)
    assert "".join(completion.choices[0].logprobs.tokens) == completion.choices[0].text
    plain, penalised = (client.completions.create(model="demo", prompt="la la la la la la la la", temperature=0,
                                                  max_tokens=12, frequency_penalty=p, presence_penalty=p)
                        for p in (0.0, 2.0))
    assert penalised.choices[0].text != plain.choices[0].text


def first_id(client, token_text):
    """The id of a token, through the completions endpoint's token prompts (the server has no tokenize route)."""
    from zephyr import Tokenizer
    from zephyr.demo import demo_model_path
    return Tokenizer.from_gguf(demo_model_path()).encode_continuation(token_text)[0]


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "shoe-size"}}}}}}, "response_format"),
    ({"grammar": 'root ::= "a" | b'}, "grammar"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_structured_requests_are_400s_naming_the_field(client, extra, param):
    pytest.importorskip("llguidance")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=4, extra_body=extra)
    assert refused.value.param == param and refused.value.status_code == 400
    assert client.chat.completions.create(model="demo", messages=QUESTION, max_tokens=2).choices   # still serving


# -- errors in OpenAI's shape ------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, param", [
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]}, 400, "functions"),
])
def test_bad_chat_requests_get_openai_errors(tiny_url, body, status, param):
    response = httpx.post(tiny_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


def test_structured_requests_without_llguidance_are_400s_naming_the_extra(tiny_url, monkeypatch):
    from zephyr import grammar
    from zephyr.errors import MissingDependencyError

    def missing():
        raise MissingDependencyError("grammars, JSON schemas and tool calls need llguidance: "
                                     "pip install 'zephyr[structured]'")
    monkeypatch.setattr(grammar, "_llguidance", missing)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": {"type": "json_object"}}
    response = httpx.post(tiny_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 400 and "zephyr[structured]" in response.json()["error"]["message"]
    del body["response_format"]
    assert httpx.post(tiny_url + "/v1/chat/completions", json=body, timeout=TIMEOUT).status_code == 200


def test_other_errors_get_openai_errors(tiny_url):
    post = lambda path, **kw: httpx.post(tiny_url + path, timeout=TIMEOUT, **kw)  # noqa: E731
    response = post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = post("/v1/completions", json={"prompt": "word " * 600, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    response = post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True, "echo": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "echo"
    response = post("/v1/completions", json={"prompt": [5, 10**9], "max_tokens": 2})
    assert response.status_code == 400 and "token ids" in response.json()["error"]["message"]
    response = httpx.get(tiny_url + "/v1/nothing", timeout=TIMEOUT)
    assert response.status_code == 404 and "no such endpoint" in response.json()["error"]["message"]
    response = httpx.get(tiny_url + "/v1/chat/completions", timeout=TIMEOUT)
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_sse_framing_and_token_prompts(tiny_url):
    body = {"prompt": [1, 100, 200], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", tiny_url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = httpx.post(tiny_url + "/v1/completions", json=dict(body, stream=False), timeout=TIMEOUT).json()
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# -- one model, one generation at a time ---------------------------------------------------------------
def chat(url, content, max_tokens=6):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_concurrent_requests_queue_and_do_not_interleave(tiny_url):
    prompts = ["alpha beta", "gamma delta epsilon", "zeta"]
    expected = {p: chat(tiny_url, p) for p in prompts}
    results = {}
    threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, chat(tiny_url, p))) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == expected


def test_the_event_loop_answers_while_generating(tiny_url, slow_forward):
    body = {"prompt": "hello", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", tiny_url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        health = httpx.get(tiny_url + "/health", timeout=TIMEOUT).json()
        assert health["requests_in_progress"] == 1   # answered while the generation was still running
        assert [line for line in lines if line][-1] == "data: [DONE]"


def wait_until_idle(url, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(url + "/health", timeout=TIMEOUT).json()["requests_in_progress"] == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(tiny_url, tiny_llm, slow_forward, stream):
    reference = chat(tiny_url, "after the disconnect")
    body = {"messages": [{"role": "user", "content": "go on and on"}], "max_tokens": 400, "temperature": 0,
            "stream": stream}
    with httpx.Client(timeout=TIMEOUT) as leaving:
        if stream:
            with leaving.stream("POST", tiny_url + "/v1/chat/completions", json=body) as response:
                assert next(line for line in response.iter_lines() if line).startswith("data: ")
        else:
            with pytest.raises(httpx.ReadTimeout):   # leave after half a second
                leaving.post(tiny_url + "/v1/chat/completions", json=body, timeout=0.5)
    # 400 tokens would take >= 8 s: the generation must stop as soon as the server sees the client leave.
    assert wait_until_idle(tiny_url, seconds=5.0), "the generation went on after the client left"
    assert len(tiny_llm.tokens) < 100
    started = time.monotonic()
    assert chat(tiny_url, "after the disconnect") == reference   # the model is in a good state
    assert time.monotonic() - started < 30


def test_a_full_queue_answers_503(tiny_llm, slow_forward):
    with live_server(tiny_llm, max_queue=1) as url:
        body = {"prompt": "hello", "max_tokens": 40, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as running:
            lines = running.iter_lines()   # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")
            response = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=TIMEOUT)
            assert response.status_code == 503 and response.json()["error"]["code"] == "server_overloaded"


# -- the command --------------------------------------------------------------------------------------
def test_zephyr_serve_command(tiny_path):
    port = free_port()
    env = dict(os.environ, ZEPHYR_API_KEY="sk-cli")
    server = subprocess.Popen([sys.executable, "-m", "zephyr.cli", "serve", tiny_path, "--port", str(port),
                               "--model-alias", "tiny-model", "--log-level", "warning"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "zephyr serve did not start in 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-cli", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in client.models.list()] == ["tiny-model"]
        reply = client.chat.completions.create(model="tiny-model", messages=QUESTION, max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
    finally:
        interrupt(server, 15)   # Ctrl-C: a graceful shutdown
    assert server.returncode in (0, 130), server.stdout.read()   # 130: uvicorn re-raised the SIGINT


def test_serve_without_the_extra_names_the_install_command(monkeypatch, capsys, tiny_path):
    from zephyr.cli import main
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", tiny_path]) == 1
    assert "pip install 'zephyr[server]'" in capsys.readouterr().err


def test_serve_on_ray_without_the_extra_names_the_install_command(monkeypatch, capsys, tiny_path):
    import zephyr.integrations
    from zephyr.cli import main
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "zephyr.integrations.ray_serve", raising=False)
    monkeypatch.delattr(zephyr.integrations, "ray_serve", raising=False)   # as if never imported
    assert main(["serve", tiny_path, "--ray-replicas", "2"]) == 1
    assert "pip install 'zephyr[ray]'" in capsys.readouterr().err


def test_the_command_and_the_server_do_not_import_ray():
    check = ("import sys, zephyr.cli, zephyr.server; "
             "sys.exit(' '.join(m for m in sys.modules if m.split('.')[0] == 'ray') or None)")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)
