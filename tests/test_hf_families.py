"""The table of Hugging Face families (`minitx_fn/hf/families.py`): every model_type
has a mapping with the same functions, and a model is written as the family its shape is."""

from __future__ import annotations

import pytest

from minitx_fn import defaults
from minitx_fn.config import ModelConfig
from minitx_fn.errors import HFError
from minitx_fn.hf import families

FUNCTIONS = ("config_from_hf", "config_to_hf", "expected_shapes", "params_from_hf", "params_to_hf", "check_exportable")


@pytest.mark.parametrize("model_type", sorted(families.MAPPINGS))
def test_every_family_maps_with_the_same_functions_and_reads_back_its_own_config(model_type):
    mapping = families.mapping(model_type)
    assert all(callable(getattr(mapping, name, None)) for name in FUNCTIONS)
    arch = defaults.ARCHS["gpt2" if model_type == "gpt2" else "llama"]
    model = ModelConfig(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_len=8, init_std=0.02, embed_std=0.02,
                        **arch,
                        **({"qkv_bias": True} if model_type == "qwen2" else {}))
    assert families.family(model) == model_type
    written = mapping.config_to_hf(model)
    assert written["model_type"] == model_type and mapping.config_from_hf(written) == model


def test_a_model_type_minitx_does_not_map_is_one_line():
    for model_type, said in (("bert", "says model_type 'bert'"), (None, "has no model_type")):
        with pytest.raises(HFError, match=f"config.json {said}; minitx imports"):
            families.mapping(model_type)
