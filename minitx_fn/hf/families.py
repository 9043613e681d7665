"""The families minitx maps to and from Hugging Face folders, in one table.

Each mapping (`hf/gpt2.py`, `hf/llama.py`) is a module with the same few functions:
`config_from_hf`, `config_to_hf`, `expected_shapes`, `params_from_hf`,
`params_to_hf` and `check_exportable`. A new family is one more module and a row here.
"""

from __future__ import annotations

from minitx_fn.config import ModelConfig
from minitx_fn.errors import HFError
from minitx_fn.hf import gpt2, llama

MAPPINGS = {"gpt2": gpt2, "llama": llama, "qwen2": llama}       # config.json's model_type -> its mapping
NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2"}    # as people write them


def mapping(model_type):
    """The mapping module of a config.json's model_type; HFError naming any other.

    Example:
        >>> mapping("qwen2").__name__
        'minitx_fn.hf.llama'
        >>> mapping("bert")
        Traceback (most recent call last):
        minitx_fn.errors.HFError: config.json says model_type 'bert'; minitx imports ['gpt2', 'llama', 'qwen2']
    """
    if model_type in MAPPINGS:
        return MAPPINGS[model_type]
    said = "has no model_type" if model_type is None else f"says model_type {model_type!r}"
    raise HFError(f"config.json {said}; minitx imports {list(MAPPINGS)}")


def family(config: ModelConfig) -> str:
    """The model_type a model is written as: "llama" or "qwen2" for a model of Llama's
    shape, else "gpt2" (whose `check_exportable` says what else it must have).

    Example:
        >>> from minitx_fn import defaults
        >>> family(ModelConfig(vocab_size=5, **defaults.ARCHS["llama"])), family(ModelConfig(vocab_size=5))
        ('llama', 'gpt2')
    """
    return llama.family(config) or "gpt2"


__all__ = ["MAPPINGS", "NAMES", "family", "mapping"]
