"""benchmarks/scale_plan.py and experiments/configs/scale.py: the training step compiled from
abstract arrays reports finite parameters, memory and FLOPs, and memory grows with the model."""

import math

import jax
import pytest

from benchmarks import scale_plan
from experiments.configs import scale


def _tiny(d_model: int):
    """A scale config (transformer, 130M, 2k) shrunk to a 1-layer model of width d_model."""
    config = scale.get_config("transformer:130M:2k")
    config.model.update(vocab_size=128, d_model=d_model, n_layers=1, n_heads=2, d_ff=None,
                        window=16, chunk_size=16, d_state=8, ssm_head_dim=16)
    config.data.seq_len = 32
    config.batch_size = 2
    return config


def test_plan_fields_are_finite_and_memory_grows_with_size():
    rows = [scale_plan.plan_config(_tiny(d), jax.devices()[:1]) for d in (16, 64)]
    for row in rows:
        row["implied"] = scale_plan.implied(row, mfu=0.4)
        numbers = [row["params"], row["compile_s"], *row["memory"].values(),
                   *row["flops_per_token"].values(),
                   *(v for chip in row["implied"].values() for v in (chip["step_s"],
                                                                   chip["train_hours"]))]
        assert all(math.isfinite(x) and x >= 0 for x in numbers), row
        assert row["memory"]["total"] > 0 and row["flops_per_token"]["xla"] > 0, row
        assert row["tokens_per_step"] == 2 * 32 and row["devices"] == 1
        assert set(row["implied"]) == set(scale_plan.ACCELERATORS)
    small, large = rows
    assert large["params"] > small["params"]
    assert large["memory"]["total"] > small["memory"]["total"]
    assert large["memory"]["argument"] > small["memory"]["argument"]
    # 6N + attention: 12 d_model x context for one full-attention layer
    assert small["flops_per_token"]["6N"] == 6 * small["params"]
    assert small["flops_per_token"]["attention"] == 12 * 16 * 32


def test_bad_config_argument_names_what_is_allowed():
    with pytest.raises(ValueError, match=r"'bmojo:2B:2k'.*PRESET:SIZE:CONTEXT.*1\.4B"):
        scale.get_config("bmojo:2B:2k")
    assert len(scale.arguments()) == 6 * 4 * 2
