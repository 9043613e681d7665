"""Hugging Face model folders in and out: GPT-2, Llama and Qwen2.

    folder.py    the files of a folder, for every family: import_run, export_run, import_dir, ...
    families.py  the table from config.json's model_type to its mapping
    gpt2.py      GPT-2's config.json and tensors to ours, and back
    llama.py     Llama's and Qwen2's
    tensors.py   what the mappings share: tree paths, checked tensors

Every error is an `errors.HFError`. The commands are `minitx import-hf` and
`minitx export-hf` (`import-gpt2` and `export-gpt2` their older names).
"""

from minitx_fn.hf import families, folder, gpt2, llama, tensors
from minitx_fn.hf.families import family
from minitx_fn.hf.folder import export_files, export_run, import_dir, import_run, read_config, write_dir

__all__ = ["export_files", "export_run", "families", "family", "folder", "gpt2", "import_dir", "import_run", "llama",
           "read_config", "tensors", "write_dir"]
