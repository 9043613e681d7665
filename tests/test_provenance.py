"""Provenance (`minitx_fn.provenance`): a saved run's model is held to the code and the
maths that saved it, so nothing decodes a run as a model it is not: a layer patched
while a run trains, or after, is refused at the end of the run and at load; an
install whose code and logits moved is refused naming the module; code changed on
purpose is accepted once `upgrade` records it. A class other than the built-in one is
built only with consent."""

from __future__ import annotations

import io
import json
import os

import pytest

from minitx_fn import checkpoint, provenance
from minitx_fn.config import ModelConfig
from minitx_fn.errors import CheckpointError, RunFailed
from tests.helpers import standard_promotion


@pytest.fixture(autouse=True)
def _optax_promotion():
    with standard_promotion():
        yield


def test_a_model_class_of_ones_own_is_built_only_with_consent():
    from tests.variants import Parallel
    config = ModelConfig(vocab_size=5, d_model=8, n_heads=2).to_dict()
    assert provenance.resolve(provenance.BUILTIN_CODE, config) == ModelConfig(**config)
    with pytest.raises(CheckpointError, match="'tests.variants:Parallel', code of its own.*trust_code=True"):
        provenance.resolve("tests.variants:Parallel", config)
    assert provenance.resolve("tests.variants:Parallel", config, trust_code=True) == Parallel(**config)


def test_a_patched_layer_never_decodes_a_saved_run_as_another_model(tmp_path, monkeypatch):
    """The issue that brought the provenance: attention.apply patched (to other maths)
    while a run trains, apply_cached not. The run is saved but the job refuses to call it
    done (its cached decode would be another model); loading it, patched or not, is
    refused; so is a layer patched after a save, whatever it changes (the code differs),
    until `upgrade` records code that was changed on purpose and computes the same."""
    from minitx_fn import job
    from minitx_fn.layers import attention, linear
    real, real_linear = attention.apply, linear.apply

    def shifted(params, x, spec, **kwargs):              # a layer of other maths
        return 3.0 * real(params, x, spec, **kwargs)

    run = str(tmp_path / "patched")
    model = {"d_model": 24, "n_heads": 2, "n_layers": 1, "max_len": 12}    # shapes no other test traces
    monkeypatch.setattr(attention, "apply", shifted)
    with pytest.raises(RunFailed, match="cached decode \\(apply_cached\\) disagrees with its apply.*the run is saved"):
        job.train(model=model, training={"steps": 40, "log_every": 40}, run_dir=run, sample_tokens=0,
                  log=io.StringIO())
    assert checkpoint.saved_step(run) == 40
    with pytest.raises(CheckpointError, match="cached decode \\(apply_cached\\) disagrees"):
        checkpoint.load_model(run)
    monkeypatch.setattr(attention, "apply", real)
    with pytest.raises(CheckpointError, match="the code of minitx_fn.layers.attention differs from the code that saved"):
        checkpoint.load_model(run)

    clean = str(tmp_path / "clean")            # another model: this process holds the patched one's compiled steps
    job.train(model={**model, "d_model": 20}, training={"steps": 40, "log_every": 40}, run_dir=clean, sample_tokens=0,
              log=io.StringIO())
    checkpoint.load_model(clean)
    # A patch of one logit column of the head, which no fixed probe of a few ids and
    # columns would see: refused for its code.
    monkeypatch.setattr(linear, "apply", lambda p, x, **k: (lambda y: y.at[..., 8:].add(3.0) if y.shape[-1] ==
                                                                       p["w"].shape[-1] else y)(real_linear(p, x, **k)))
    with pytest.raises(CheckpointError, match="the code of minitx_fn.layers.linear differs"):
        checkpoint.load_model(clean)
    monkeypatch.setattr(linear, "apply", real_linear)
    # With another release of the library the probe decides: an edited install whose
    # code (its digest) and logits moved is refused, naming the module. (Digests and
    # probe edited in meta.json: this process keeps its compiled probe of the real code.)
    meta_path = os.path.join(clean, "checkpoint", "meta.json")
    meta = json.load(open(meta_path))
    prov = meta["provenance"]
    edited_code = {**prov["library"], "minitx_fn.layers.linear": "0" * len(prov["library"]["minitx_fn.layers.linear"])}
    moved = " ".join(str(2 * float(x) + 1) for x in prov["probe"]["values"].split())
    json.dump({**meta, "provenance": {**prov, "minitx_fn": "0.0.9", "library": edited_code,
                                      "probe": {**prov["probe"], "values": moved}}}, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="does not compute what it computed when the run was saved.*its code "
                                              "changed \\(minitx_fn.layers.linear\\)"):
        checkpoint.load_model(clean)
    # Code changed on purpose, computing the same: refused until `upgrade` records it.
    json.dump({**meta, "provenance": {**prov, "library": edited_code}}, open(meta_path, "w"))
    with pytest.raises(CheckpointError, match="linear differs .*minitx upgrade RUN"):
        checkpoint.load_model(clean)
    assert checkpoint.upgrade(clean)[0] == 9
    checkpoint.load_model(clean)


def test_a_changed_default_argument_is_a_change_of_code(monkeypatch):
    """A default value is part of what a function computes: editing it changes the
    digest of the model's own module, so a run's refusal names the code, not its config."""
    import sys
    import types
    module = types.ModuleType("edited_defaults")
    monkeypatch.setitem(sys.modules, "edited_defaults", module)
    source = ("import dataclasses\nfrom minitx_fn.config import ModelConfig\n"
              "def rms(x, eps={eps}):\n    return x + eps\n"
              "@dataclasses.dataclass(frozen=True, kw_only=True)\nclass Mine(ModelConfig):\n    pass\n")
    exec(source.format(eps="1e-6"), module.__dict__)
    before = provenance.digests(module.Mine(vocab_size=5))["own"]
    exec(source.format(eps="1e-2"), module.__dict__)
    after = provenance.digests(module.Mine(vocab_size=5))["own"]
    assert set(before) == {"edited_defaults"} and before != after
