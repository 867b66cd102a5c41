"""Servers that tests and benchmarks start: a free loopback port, and stopping a child as Ctrl-C would."""
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt(process: subprocess.Popen, grace: float) -> None:
    """SIGINT `process` (a server drains and exits), killing it if it has not exited after `grace` s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
