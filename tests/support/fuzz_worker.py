"""A crash-proof place to open hostile model files: a child process that reads and loads them one
by one, under an address-space limit, while the parent watches for crashes and hangs.

Parent side: `FuzzWorker(tmp_dir).run(content)` writes `content` to a file, has the child open it
and returns an `Outcome`. A segfault, abort, or a case running past its timeout kills the child
(it is restarted for the next case) and comes back as an outcome the tests fail on.

Child side (`python tests/support/fuzz_worker.py <model>`): warms up on a good model, then caps its
address space at what it uses plus `HEADROOM_BYTES`, so a case that tries to allocate what a file
merely claims dies with MemoryError instead of taking the machine down. For each case it runs
`zephyr.gguf.read`, and for "load" cases `AutoModelForCausalLM.from_pretrained` plus a short greedy
generation, so the native kernels run on whatever the checks let through.
"""
import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HEADROOM_BYTES = 1 << 30        # a case may allocate at most this much beyond the warmed-up worker
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")   # then no address-space cap (see docs/security.md)
CASE_TIMEOUT_S = 30.0           # generous: a case takes milliseconds, the machine may be busy
STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    status: str          # "ok", "error" (an exception), "crash" (the child died), "hang" (timed out)
    stage: str = ""      # where it stopped: "read", "load" or "generate"
    type: str = ""       # exception class name
    zephyr: bool = False  # whether the exception is a zephyr.ZephyrError
    message: str = ""

    @property
    def acceptable(self) -> bool:
        """A clean outcome: the file worked, or zephyr refused it with its own error and a message."""
        return self.status == "ok" or (self.status == "error" and self.zephyr and bool(self.message.strip()))


class FuzzWorker:
    """Parent side: feeds cases to one child process, restarting it after a crash or hang."""

    def __init__(self, tmp_dir, warmup_model, timeout=CASE_TIMEOUT_S):
        self.tmp_dir = Path(tmp_dir)
        self.warmup_model = str(warmup_model)
        self.timeout = timeout
        self.cases = 0          # every case run, for the record
        self.loaded = 0         # cases that loaded and generated
        self.proc = None

    def _start(self):
        # One OpenMP thread unless asked: on a shared, busy machine a second one mostly waits at barriers.
        threads = os.environ.get("ZEPHYR_FUZZ_THREADS", "1")
        env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS=threads)
        self.proc = subprocess.Popen([sys.executable, __file__, self.warmup_model], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        ready = self._reply(STARTUP_TIMEOUT_S)
        if ready is None or ready.get("status") != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {ready} {self._stderr()}")

    def _reply(self, timeout):
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"status": "eof"}

    def _stderr(self):
        self.proc.kill()
        self.proc.wait()
        text = self.proc.stderr.read().decode(errors="replace")
        self.proc = None
        return text[-3000:]

    def run(self, content: bytes, mode="load", size=None) -> Outcome:
        """Write `content` to a file (followed by a sparse hole of zeros up to `size`) and open it in
        the child: mode "read" (the reader only) or "load" (load and generate)."""
        if self.proc is None:
            self._start()
        self.cases += mode in ("read", "load")
        path = self.tmp_dir / f"case-{self.cases}-{mode}.gguf"
        path.write_bytes(content)
        if size is not None:
            os.truncate(path, size)
        try:
            self.proc.stdin.write((json.dumps({"path": str(path), "mode": mode}) + "\n").encode())
            self.proc.stdin.flush()
            reply = self._reply(self.timeout)
        except BrokenPipeError:
            reply = {"status": "eof"}
        finally:
            path.unlink()
        if reply is None:
            return Outcome("hang", message=f"no answer within {self.timeout} s\n{self._stderr()}")
        if reply["status"] == "eof":
            code = self.proc.poll()
            return Outcome("crash", message=f"worker died (exit status {code})\n{self._stderr()}")
        if reply["status"] == "ok" and mode == "load":
            self.loaded += 1
        return Outcome(**reply)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(10)
            self.proc = None


# ---- child side ---------------------------------------------------------------------------------

# Misbehaviours on demand, so a test can check that the parent notices each kind.
SELF_TESTS = {
    "crash": lambda: os.abort(),
    "hang": lambda: __import__("time").sleep(3600),
    "allocate": lambda: bytearray(HEADROOM_BYTES + (1 << 30)),
}


def _open(path, mode):
    """Run one case; return (stage reached, None) or raise with `stage` attached to the exception."""
    from zephyr import AutoModelForCausalLM, gguf

    if mode in SELF_TESTS:
        SELF_TESTS[mode]()
    stage = "read"
    try:
        gguf.read(path).close()
        if mode == "load":
            stage = "load"
            llm = AutoModelForCausalLM.from_pretrained(path, context_length=32, batch_size=4)
            with llm:
                stage = "generate"
                llm("Hi", max_new_tokens=2, temperature=0)
    except BaseException as exc:
        exc.fuzz_stage = stage
        raise


def _child(warmup_model):
    import resource

    from zephyr import ZephyrError

    _open(warmup_model, "load")
    if not UNDER_ASAN:   # AddressSanitizer reserves terabytes of shadow address space
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM_BYTES, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = sys.stdout
    out.write(json.dumps({"status": "ready"}) + "\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        try:
            _open(case["path"], case["mode"])
            reply = {"status": "ok"}
        except Exception as exc:   # MemoryError included: a refused allocation is a finding
            reply = {"status": "error", "stage": getattr(exc, "fuzz_stage", "read"), "type": type(exc).__name__,
                     "zephyr": isinstance(exc, ZephyrError), "message": str(exc)[:2000]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _child(sys.argv[1])
