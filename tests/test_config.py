"""Config validation: every bad value names itself and what is allowed."""

import pytest

from bmojo_jax import ModelConfig


@pytest.mark.parametrize("overrides,match", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(window=0), "window=0"),
    (dict(pattern="AXB"), "pattern='AXB'"),
    (dict(eidetic_per_chunk=3, eidetic_slots=10), "eidetic_slots=10 must be a multiple"),
    (dict(eidetic_per_chunk=0, eidetic_slots=4), "eidetic_slots=4 needs eidetic_per_chunk"),
    (dict(eidetic_per_chunk=100), "eidetic_per_chunk=100 exceeds"),
    (dict(ssm_kind="s4"), "ssm_kind='s4'"),
    (dict(implementation="cuda"), "implementation='cuda'"),
    (dict(eidetic_eviction="lru"), "eidetic_eviction='lru'"),
    (dict(d_model=96, n_heads=32), "head_dim = d_model // n_heads = 3 must be even"),
    (dict(innovation_loss_weight=-1.0), "innovation_loss_weight"),
    (dict(innovation_loss_weight=float("nan")), "innovation_loss_weight=nan"),
    (dict(rope_base=0.0), "rope_base=0.0: must be a finite number >= 1"),
    (dict(rope_base=-5.0), "rope_base=-5.0"),
    (dict(eidetic_selection="oracle"), "eidetic_selection='oracle'"),
    (dict(eidetic_threshold=0.0), "eidetic_threshold=0.0"),
    (dict(eidetic_per_chunk=4, eidetic_slots=0), "eidetic_slots=0 must be a positive multiple"),
    (dict(n_layers=0), "n_layers=0"),
])
def test_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.preset("bmojo", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="Unknown preset 'mistral'.*transformer"):
        ModelConfig.preset("mistral")
    with pytest.raises(ValueError, match=r"Unknown ModelConfig field\(s\) \['d_models'\]"):
        ModelConfig.preset("bmojo", d_models=4)


@pytest.mark.parametrize("preset,n_layers,mixers", [
    ("transformer", 3, "AAA"), ("swa", 2, "WW"), ("mamba", 2, "MM"), ("hybrid", 2, "MA"),
    ("hybrid", 6, "MMMAMM"), ("bmojo_f", 2, "FF"), ("bmojo", 2, "BB"),
])
def test_layer_patterns(preset, n_layers, mixers):
    config = ModelConfig.preset(preset, n_layers=n_layers)
    assert config.layer_mixers == mixers
    if preset == "bmojo_f":
        assert config.eidetic_per_chunk == 0 and config.eidetic_slots == 0
