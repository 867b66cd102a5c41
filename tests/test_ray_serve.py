"""`zephyr serve --ray-replicas`: two replicas of the demo model on a local Ray instance behind one
endpoint, driven by the official openai client; a replica killed and replaced; Ctrl-C leaving no
Ray process behind; bad addresses and unloadable models failing fast with a clear message."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'zephyr[ray]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from zephyr.cli import main, serve_options, server_spec  # noqa: E402
from zephyr.integrations import ray_serve  # noqa: E402
from zephyr.server import ServerSpec  # noqa: E402
from zephyr.testing.processes import free_port, interrupt  # noqa: E402

pytestmark = pytest.mark.ray

TIMEOUT = 120          # seconds one request may take on a busy 2-core machine
START_TIMEOUT = 240    # seconds for Ray, Serve and two replicas to start there
API_KEY = "sk-ray"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def descendants(pid: int) -> set:
    """The processes below `pid` (Ray's: the GCS, the raylet and the workers under it)."""
    children = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def start(args, log: Path, **env) -> subprocess.Popen:
    """`zephyr serve ARGS` on a local Ray instance of its own (RAY_ADDRESS unset), output to `log`."""
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "zephyr.cli", "serve", *args, "--log-level", "warning"],
                                env=environment, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    """Two replicas of the demo model, one thread each, behind one port; the key and alias as options."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    process = start([str(smollm2_path), "--ray-replicas", "2", "--threads", "1", "--port", str(port),
                     "--model-alias", "demo-on-ray"], log, ZEPHYR_API_KEY=API_KEY)
    served = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + START_TIMEOUT
    while "zephyr: serving" not in log.read_text(errors="replace"):
        assert process.poll() is None, served.output()
        assert time.monotonic() < deadline, f"not serving after {START_TIMEOUT} s:\n{served.output()}"
        time.sleep(0.5)
    yield served
    interrupt(process, 60)


def client_for(server, timeout=TIMEOUT):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=timeout, max_retries=0)


def ask(client, stream: bool, max_tokens=8) -> tuple:
    """(text, the fingerprints on the response) for QUESTION at temperature 0."""
    reply = client.chat.completions.create(model="demo-on-ray", messages=QUESTION, temperature=0,
                                           max_tokens=max_tokens, stream=stream)
    if not stream:
        return reply.choices[0].message.content, {reply.system_fingerprint}
    chunks = list(reply)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, {c.system_fingerprint for c in chunks}


# -- two replicas, one endpoint -------------------------------------------------------------------------
def test_concurrent_chats_are_all_answered_by_both_replicas(server):
    client = client_for(server)
    fingerprints = set()
    for _ in range(3):   # Ray's router picks replicas at random among the least busy: both come up at once, or soon
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda stream: ask(client, stream), [False, True] * 4))
        texts = {text for text, _ in results}
        assert len(texts) == 1 and "Paris" in texts.pop()   # same model, greedy: the same reply from either
        assert all(len(marks) == 1 for _, marks in results)  # a request (every chunk of a stream) stays on one
        fingerprints |= set().union(*(marks for _, marks in results))
        if len(fingerprints) == 2:
            break
    assert len(fingerprints) == 2, fingerprints
    for fingerprint in fingerprints:
        host, pid = fingerprint.rsplit(":", 1)
        assert host == socket.gethostname() and int(pid) in descendants(server.process.pid)


def test_health_reports_the_replicas_and_options_reach_each_replica(server):
    health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == "demo-on-ray"
    assert health["deployment"] == "HEALTHY" and health["replicas"] == {"RUNNING": 2}
    assert health["system_fingerprint"].startswith(socket.gethostname() + ":")
    for _ in range(4):   # the key and alias came from the command line and the environment, to every replica
        assert [m.id for m in client_for(server).models.list()] == ["demo-on-ray"]
        assert httpx.get(server.url + "/v1/models", timeout=TIMEOUT).status_code == 401
    page = httpx.get(server.url + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_a_killed_replica_is_replaced_and_requests_succeed_again(server):
    client = client_for(server, timeout=30)
    _, (killed,) = ask(client, stream=False, max_tokens=1)
    os.kill(int(killed.rsplit(":", 1)[1]), signal.SIGKILL)
    answered, failures, deadline = set(), 0, time.monotonic() + 90
    while not (len(answered - {killed}) == 2 and health_replicas(server) == {"RUNNING": 2}):
        assert time.monotonic() < deadline, f"not recovered in 90 s: answered by {answered}, {failures} failures"
        try:
            _, marks = ask(client, stream=bool(len(answered) % 2), max_tokens=2)
            answered |= marks
        except openai.APIError:
            failures += 1
            time.sleep(0.5)
    assert killed not in answered


def health_replicas(server):
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return httpx.get(server.url + "/health", timeout=30).json().get("replicas")


def test_ctrl_c_shuts_the_deployment_and_ray_down(server):
    ray_processes = descendants(server.process.pid)
    assert len(ray_processes) >= 4, ray_processes   # at least the GCS, the raylet and two replicas
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 0, server.output()
    deadline = time.monotonic() + 30
    while left := {pid for pid in ray_processes if alive(pid)}:
        assert time.monotonic() < deadline, f"still running after Ctrl-C: {left}"
        time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_a_ray_address_where_nothing_listens_fails_within_seconds(capsys, smollm2_path, address):
    address = address.format(port=free_port())
    began = time.monotonic()
    assert main(["serve", str(smollm2_path), "--ray-replicas", "1", "--ray-address", address]) == 1
    assert time.monotonic() - began < 10
    error = capsys.readouterr().err
    assert f"no Ray cluster answers at {address}" in error and "ray start --head" in error


def test_bad_ray_options_are_refused(capsys, smollm2_path):
    assert main(["serve", str(smollm2_path), "--ray-replicas", "1", "--ray-address", "nowhere"]) == 1
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert main(["serve", str(smollm2_path), "--ray-replicas", "0"]) == 1
    assert "--ray-replicas must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(smollm2_path), "--ray-address", "auto"]) == 1
    assert "--ray-address needs --ray-replicas" in capsys.readouterr().err


def test_a_replica_that_cannot_load_the_model_fails_the_deployment(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    process = start([str(missing), "--ray-replicas", "1", "--threads", "1", "--port", str(free_port())],
                    tmp_path / "serve.log")
    try:
        rc = process.wait(START_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    output = (tmp_path / "serve.log").read_text(errors="replace")
    last = output.strip().splitlines()[-1]
    assert rc == 1 and last.startswith("zephyr: error: the Ray Serve deployment failed: "), output[-4000:]
    assert f"{missing}: no such file or directory" in last   # the replica's own error


def test_more_replicas_than_the_local_instance_can_place_are_refused(capsys, smollm2_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", str(smollm2_path), "--ray-replicas", "2", "--threads", str(4 * os.cpu_count())]) == 1
    assert "lower --ray-replicas or --threads" in capsys.readouterr().err


# -- the builders, without a cluster ---------------------------------------------------------------------
def test_each_replica_reserves_its_threads_and_a_gpu_when_it_uses_one():
    spec, resources = ray_serve.per_replica(ServerSpec("demo"))
    assert resources == {"num_cpus": 1} and spec.load_options["threads"] == 1
    spec, resources = ray_serve.per_replica(ServerSpec("demo", {"threads": 3, "gpu_layers": -1}))
    assert resources == {"num_cpus": 3, "num_gpus": 1} and spec.load_options["threads"] == 3
    spec, resources = ray_serve.per_replica(ServerSpec("demo"), {"num_cpus": 4})
    assert resources == {"num_cpus": 4} and spec.load_options["threads"] == 4


def test_the_python_builder_splits_load_and_server_options(monkeypatch):
    built = {}
    monkeypatch.setattr(ray_serve, "application", lambda spec, **options: built.update(spec=spec, **options))
    ray_serve.app("demo", replicas=3, server_options={"api_key": "k"}, threads=2, context_length=512)
    assert built == {"spec": ServerSpec("demo", {"threads": 2, "context_length": 512}, {"api_key": "k"}),
                     "replicas": 3, "ray_actor_options": None, "autoscaling_config": None}


def test_serve_run_arguments_are_read_as_zephyr_serve_reads_its_options(monkeypatch):
    built = {}
    monkeypatch.setattr(ray_serve, "application", lambda spec, replicas: built.update(spec=spec, replicas=replicas))
    ray_serve.build({"model": "demo", "replicas": "2", "threads": "1", "gpu_layers": 0, "api-key": "k",
                     "cors_origin": ["https://a.example", "https://b.example"]})
    expected = server_spec(serve_options(["demo", "--threads", "1", "--api-key", "k", "--cors-origin",
                                          "https://a.example", "--cors-origin", "https://b.example"]))
    assert built == {"spec": expected, "replicas": 2}
    assert expected.load_options["threads"] == 1 and expected.app_options["cors_origins"] == ("https://a.example",
                                                                                             "https://b.example")
    for switch in (True, False):
        ray_serve.build({"model": "demo", "repack": switch})
        assert built["spec"].load_options["repack"] is switch
    with pytest.raises(ValueError, match="invalid int value"):
        ray_serve.build({"model": "demo", "threads": "many"})
    with pytest.raises(ValueError, match="port: set by `serve run`"):
        ray_serve.build({"model": "demo", "port": 9000})
    with pytest.raises(ValueError, match="need `model`"):
        ray_serve.build({"threads": 1})
