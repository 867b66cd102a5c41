"""The families zephyr runs, read from metadata as llama.cpp reads them (zephyr.architectures,
ModelConfig), and every other architecture or variant refused by name at load."""
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from zephyr import AutoModelForCausalLM
from zephyr.architectures import FAMILIES
from zephyr.config import ModelConfig
from zephyr.errors import GGUFError
from zephyr.quants import GGMLType
from zephyr.testing.gguf_writer import TensorSpec, write_gguf
from zephyr.testing.synthetic import FAMILY_PRESETS, PRESETS, llama_metadata, llama_tensors, minimal_llama_vocab

SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3"


class MetadataOnly:
    """What ModelConfig.from_gguf reads of a GGUFFile: metadata, and a tensor table of n tensors."""

    def __init__(self, metadata, n_layers, vocab=300):
        self.path, self.metadata = "model.gguf", metadata
        self.tensors = [SimpleNamespace(name=f"t{i}") for i in range(6 * n_layers)]
        self.embedding = SimpleNamespace(name="token_embd.weight", shape=(vocab, metadata["x.embedding_length"]))

    def __contains__(self, name):
        return name == "token_embd.weight"

    def tensor(self, name):
        return self.embedding


def config(arch, n_layers=2, **keys):
    """A ModelConfig of `arch` from metadata (d_model 256, 4 heads, keys as `<arch>.<key>`)."""
    meta = {"general.architecture": arch, "embedding_length": 256, "block_count": n_layers, "attention.head_count": 4,
            "feed_forward_length": 512, **keys}
    meta = {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in meta.items() if k != "general.architecture"}}
    file = MetadataOnly({**meta, "x.embedding_length": 256}, n_layers)
    return ModelConfig.from_gguf(file)


def test_every_family_is_supported_and_named():
    assert ", ".join(FAMILIES) == SUPPORTED


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral", "bert", "clip", "falcon", "gemma3n", "t5encoder"])
def test_other_architectures_are_refused_by_name(tmp_path, arch):
    shape = replace(PRESETS["tiny"], vocab_size=300)
    meta = llama_metadata(shape, minimal_llama_vocab(300), "other", "Q4_0")
    meta = {key.replace("llama.", f"{arch}."): value for key, value in meta.items()}
    meta["general.architecture"] = arch
    write_gguf(tmp_path / "other.gguf", meta, llama_tensors(shape, "Q4_0"))
    with pytest.raises(GGUFError, match=rf"architecture '{arch}' is not supported \(zephyr runs: {SUPPORTED}\)"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "other.gguf"))


def test_a_mixture_of_experts_in_a_llama_file_is_refused(tmp_path):
    shape = replace(PRESETS["tiny"], vocab_size=300)
    meta = llama_metadata(shape, minimal_llama_vocab(300), "mixtral", "Q4_0") | {"llama.expert_count": 8,
                                                                                 "llama.expert_used_count": 2}
    write_gguf(tmp_path / "moe.gguf", meta, llama_tensors(shape, "Q4_0"))
    with pytest.raises(GGUFError, match=rf"mixture of experts \(8 experts, as Mixtral\).*dense models of: {SUPPORTED}"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe.gguf"))


def test_a_tensor_the_graph_does_not_use_is_refused_not_ignored(tmp_path):
    shape = replace(FAMILY_PRESETS["qwen2"], vocab_size=300)
    extra = TensorSpec("blk.0.ffn_gate_inp.weight", GGMLType.F32, (shape.d_model,), np.zeros(shape.d_model, np.float32))
    write_gguf(tmp_path / "variant.gguf", llama_metadata(shape, minimal_llama_vocab(300), "v", "F32"),
               llama_tensors(shape, "F32") + [extra])
    with pytest.raises(GGUFError, match="'blk.0.ffn_gate_inp.weight' .* is not part of the qwen2 model zephyr runs"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "variant.gguf"))


def test_gemma2_slides_on_even_layers_and_caps_by_default():
    c = config("gemma2", n_layers=4, **{"attention.key_length": 128, "attention.value_length": 128})
    assert [c.layer_params(i).sliding_window for i in range(4)] == [4096, 0, 4096, 0]
    assert (c.attn_softcap, c.final_softcap, c.head_dim, c.tied_embeddings) == (50.0, 30.0, 128, True)
    p = c.layer_params(0)
    assert (p.activation, p.rope_neox, p.attn_scale, p.scores_scale) == ("gelu", True, 0.0, 1 / math.sqrt(128))


def test_gemma2_27b_scales_queries_by_the_width_per_head():
    c = config("gemma2", n_layers=46, **{"attention.key_length": 128})
    assert c.layer_params(0).scores_scale == pytest.approx(1 / math.sqrt(256 / 4))


def test_gemma3_has_five_local_layers_to_one_global_with_their_own_rope():
    c = config("gemma3", n_layers=12, **{"attention.sliding_window": 512, "rope.freq_base": 1e6,
                                         "rope.scaling.type": "linear", "rope.scaling.factor": 8.0})
    params = [c.layer_params(i) for i in range(12)]
    assert [p.sliding_window for p in params] == [512] * 5 + [0] + [512] * 5 + [0]
    assert {p.rope_base for p in params if p.sliding_window} == {10000.0} and params[5].rope_base == 1e6
    assert {p.rope_scaling.freq_scale for p in params if p.sliding_window} == {1.0}
    assert params[5].rope_scaling.freq_scale == 1 / 8 and c.final_softcap == 0.0 and c.attn_softcap == 0.0


def test_gemma3_without_a_window_attends_fully_with_the_global_base():
    c = config("gemma3", n_layers=6, **{"rope.freq_base": 1e6})
    assert {(c.layer_params(i).sliding_window, c.layer_params(i).rope_base) for i in range(6)} == {(0, 1e6)}


def test_a_window_pattern_in_the_metadata_wins():
    c = config("gemma3", n_layers=4, **{"attention.sliding_window": 8,
                                        "attention.sliding_window_pattern": [True, False, False, True]})
    assert [c.layer_params(i).sliding_window for i in range(4)] == [8, 0, 0, 8]
    with pytest.raises(GGUFError, match="one boolean per layer"):
        config("gemma3", n_layers=4, **{"attention.sliding_window": 8, "attention.sliding_window_pattern": [True]})


@pytest.mark.parametrize("arch", ["phi3", "qwen2", "qwen3"])
def test_families_whose_window_llama_cpp_ignores(arch):
    assert config(arch, **{"attention.sliding_window": 2047}).sliding_window == 0


def test_yarn_scales_positions_and_magnitude_as_llama_cpp():
    c = config("qwen2", **{"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                           "rope.scaling.original_context_length": 32768, "context_length": 131072})
    r = c.layer_params(0).rope_scaling
    # llama.cpp's attention factor cancels the kernel's own 1 + 0.1 ln(4), which then puts it back
    assert (r.freq_scale, r.ext_factor, r.attn_factor, r.n_ctx_orig) == (0.25, 1.0, pytest.approx(1.0), 32768)


@pytest.mark.parametrize("kind, factor, freq_scale", [("linear", 2.0, 0.5), ("none", 2.0, 1.0), ("longrope", 0.0, 1.0)])
def test_linear_none_and_longrope_scaling(kind, factor, freq_scale):
    r = config("llama", **{"rope.scaling.type": kind, "rope.scaling.factor": factor}).rope_scaling
    assert (r.freq_scale, r.ext_factor) == (freq_scale, 0.0)


@pytest.mark.parametrize("keys, message", [
    ({"rope.scaling.type": "dynamic"}, "rope.scaling.type 'dynamic' is not one of none, linear, yarn, longrope"),
    ({"attention.key_length": 128, "attention.value_length": 64}, "key_length 128 and value_length 64 differ"),
    ({"attention.sliding_window_pattern": "6", "attention.sliding_window": 4}, "sliding_window_pattern"),
    ({"final_logit_softcapping": -1.0}, "final_softcap -1.0 must be a finite number >= 0"),
])
def test_bad_family_metadata_is_refused(keys, message):
    with pytest.raises(GGUFError, match=message):
        config("gemma3", **keys)
