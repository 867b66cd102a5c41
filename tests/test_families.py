"""Every family's logits against llama.cpp's, on seeded synthetic files of each layout: the recording
in tests/data/family_reference.npz (tests/data/make_family_reference.py), and llama.cpp itself
where llama-cpp-python is installed. Each family's quirks are switched off one at a time to show
the comparison would catch a missed one."""
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from zephyr.backend import RopeScaling, choose_decoder_layer
from zephyr.testing.compare import relative_error
from zephyr.testing.family_cases import (FAMILIES, LAYOUTS, TOLERANCE, file_sha256, llama_cpp_logits, write_case,
                                         zephyr_logits)

RECORDING = Path(__file__).parent / "data" / "family_reference.npz"


@pytest.fixture(scope="module")
def recorded():
    with np.load(RECORDING) as data:
        return {key: data[key] for key in data.files if key != "meta"}, json.loads(str(data["meta"]))


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def assert_close(got, want, layout, what):
    for step, (g, w) in enumerate(zip(got, want)):
        error = relative_error(g, w)
        assert error <= TOLERANCE[layout], f"{what}, step {step}: relative error {error:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_llama_cpps_recording(recorded, case_dir, family, layout):
    logits, meta = recorded
    path = write_case(case_dir, family, layout)
    assert file_sha256(path) == meta["sha256"][f"{family}-{layout}"], (
        "the synthetic writer changed: rerun tests/data/make_family_reference.py")
    assert_close(zephyr_logits(path), logits[f"{family}-{layout}"], layout, f"{family} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_llama_cpp_live(llama_cpp, case_dir, family, layout):
    path = write_case(case_dir, family, layout)
    assert_close(zephyr_logits(path), llama_cpp_logits(path), layout, f"{family} {layout}")


def switch_off(weights=(), config=None, **params):
    """A prepare() for zephyr_logits dropping optional block weights, changing every block's params
    and the model config: a model that misses a quirk."""
    def prepare(llm):
        model = llm.model
        if config:
            model.config = replace(model.config, **config)
        for i, backend in enumerate(model.placement.layers):
            model.blocks[i] = replace(model.blocks[i], **{name: None for name in weights})
            model.params[i] = replace(model.params[i], **params)
            model.run_block[i] = choose_decoder_layer(backend, model.blocks[i], model.params[i])
    return prepare


QUIRKS = {
    "llama3 RoPE frequency factors": ("llama3", switch_off(weights=("rope_freqs",))),
    "qwen2 Q/K/V biases": ("qwen2", switch_off(weights=("q_bias", "k_bias", "v_bias"))),
    "qwen2 YaRN": ("qwen2", switch_off(rope_scaling=RopeScaling())),
    "qwen3 Q/K norms": ("qwen3", switch_off(weights=("q_norm", "k_norm"))),
    "gemma2 post-norms": ("gemma2", switch_off(weights=("post_attn_norm", "post_ffn_norm"))),
    "gemma2 attention soft-cap": ("gemma2", switch_off(attn_softcap=0.0)),
    "gemma2 final soft-cap": ("gemma2", switch_off(config=dict(final_softcap=0.0))),
    "gemma2 sliding window": ("gemma2", switch_off(sliding_window=0)),
    "gemma2 GELU": ("gemma2", switch_off(activation="silu")),
    "gemma3 local RoPE base": ("gemma3", switch_off(rope_base=1e6)),
    "gemma3 Q/K norms": ("gemma3", switch_off(weights=("q_norm", "k_norm"))),
    "phi3 long RoPE factors": ("phi3", switch_off(weights=("rope_freqs",))),
    "phi3 RoPE magnitude": ("phi3", switch_off(rope_scaling=RopeScaling())),
}


@pytest.mark.parametrize("quirk", QUIRKS)
def test_a_missed_quirk_is_caught(recorded, case_dir, quirk):
    family, prepare = QUIRKS[quirk]
    want = recorded[0][f"{family}-Q4_K_M"]
    got = zephyr_logits(write_case(case_dir, family, "Q4_K_M"), prepare=prepare)
    error = max(relative_error(g, w) for g, w in zip(got, want))
    assert error > 1.5 * TOLERANCE["Q4_K_M"], f"without the {quirk}, logits move by only {error:.3g}"
