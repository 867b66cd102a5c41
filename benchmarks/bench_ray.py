"""Aggregate throughput of `zephyr serve` on Ray Serve: 1 and 2 replicas (and plain `zephyr serve`).

    python benchmarks/bench_ray.py [--model demo] [--threads 1] [--replicas 1,2] [--clients 4]
                                   [--requests 6] [--max-tokens 64] [--no-plain]

For each setting it starts the command (`zephyr serve MODEL --threads T [--ray-replicas R]`, a local
Ray instance of its own), warms every replica up, then runs `--clients` streaming chat clients (the
official openai client) at once, each sending `--requests` requests of `--max-tokens` tokens one
after another. Aggregate tok/s = completion tokens of all requests / wall time from the first request
to the last token; per stream: one request's completion tokens / its time after the first token.
It prints a Markdown section for docs/benchmarks.md ("Ray Serve: aggregate throughput"). Needs
`pip install -e ".[ray]"`; takes about 5 minutes on 2 cores.
"""
import argparse
import contextlib
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from bench_cpu import machine_description, markdown_table, zephyr_revision
from zephyr.testing.processes import free_port, interrupt

# Long answers at temperature 0, different per client so no two streams are the same work.
PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain in detail how bread is baked.",
           "Describe the history of the bicycle at length.", "Write a long letter to a friend about a trip.",
           "Explain how a steam engine works, step by step.", "Describe a busy market in a big city."]


@contextlib.contextmanager
def serving(model, threads, replicas, log: Path, options=()):
    """`zephyr serve` (on `replicas` Ray Serve replicas, or plain when None; more command-line `options`)
    until the block ends; yields its URL."""
    port = free_port()
    command = [sys.executable, "-m", "zephyr.cli", "serve", model, "--threads", str(threads), "--port", str(port),
               "--log-level", "warning", *options] + (["--ray-replicas", str(replicas)] if replicas else [])
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "zephyr: serving" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(command)} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        while True:   # the plain server prints its line before uvicorn listens
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=10).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        interrupt(process, 60)


def stream_one(client, prompt, max_tokens) -> dict:
    """One streaming chat request: completion tokens, time to the first token, time after it, replica,
    and when each chunk of text came (perf_counter seconds)."""
    began = time.perf_counter()
    usage = fingerprint = None
    times = []
    for chunk in client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        usage = chunk.usage or usage
        fingerprint = chunk.system_fingerprint
    ended = time.perf_counter()
    return {"tokens": usage.completion_tokens, "ttft": times[0] - began, "after_first": ended - times[0],
            "fingerprint": fingerprint, "times": times}


def measure(url, clients, requests, max_tokens) -> dict:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    with ThreadPoolExecutor(clients) as pool:   # warm-up: enough requests at once to reach every replica
        list(pool.map(lambda i: stream_one(client, PROMPTS[i % len(PROMPTS)], 8), range(2 * clients)))

    def one_client(i):
        return [stream_one(client, PROMPTS[(i + r) % len(PROMPTS)], max_tokens) for r in range(requests)]
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for per_client in pool.map(one_client, range(clients)) for r in per_client]
    wall = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall": wall, "tok_s": tokens / wall,
            "ttft": statistics.median(r["ttft"] for r in results),
            "stream_tok_s": statistics.median((r["tokens"] - 1) / r["after_first"] for r in results),
            "replicas_seen": len({r["fingerprint"] for r in results})}


def lscpu() -> str:
    try:
        fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True,
                                                                    timeout=30).stdout.splitlines() if ":" in line)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{fields.get('Vendor ID', '?').strip()} {fields.get('Model name', '?').strip()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--threads", type=int, default=1, help="threads per replica (and of the plain server)")
    parser.add_argument("--replicas", default="1,2", help="replica counts to measure, comma-separated")
    parser.add_argument("--clients", type=int, default=4, help="streaming clients at once")
    parser.add_argument("--requests", type=int, default=6, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--no-plain", action="store_true", help="leave out plain `zephyr serve` (no Ray)")
    args = parser.parse_args(argv)
    settings = ([] if args.no_plain else [None]) + [int(r) for r in args.replicas.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for replicas in settings:
            label = f"Ray Serve, {replicas} replica{'s' * (replicas != 1)}" if replicas else "plain zephyr serve"
            print(f"{label} ...", file=sys.stderr, flush=True)
            with serving(args.model, args.threads, replicas, Path(scratch) / "serve.log") as url:
                m = measure(url, args.clients, args.requests, args.max_tokens)
            rows.append([label, str(replicas or 1), str(args.threads), str(m["replicas_seen"]), str(m["requests"]),
                         str(m["tokens"]), f"{m['wall']:.1f}", f"{m['tok_s']:.1f}", f"{m['ttft']:.2f}",
                         f"{m['stream_tok_s']:.1f}"])
            print(f"  {rows[-1][7]} tok/s aggregate", file=sys.stderr, flush=True)

    machine = machine_description()
    command = shlex.join(["python", "benchmarks/bench_ray.py", *(argv if argv is not None else sys.argv[1:])])
    print("\n".join([
        "### Run of benchmarks/bench_ray.py", "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {lscpu()}, {machine['cores']} logical CPUs, {machine['ram']} RAM, {machine['os']}",
        f"- Command: `{command}`",
        f"- Commit: {zephyr_revision()}; model {args.model}; {args.clients} streaming clients at once, "
        f"{args.requests} requests each of {args.max_tokens} tokens at most (temperature 0)", "",
        markdown_table(["setting", "replicas", "threads each", "replicas that answered", "requests",
                        "completion tokens", "wall s", "aggregate tok/s", "median time to first token s",
                        "median tok/s per stream"], rows)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
