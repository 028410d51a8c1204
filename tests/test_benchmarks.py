"""The benchmarks' variant names (`PRESET[/FIELD=VALUE]...`) read as the configs they name."""

import pytest

from benchmarks.train_step import variant_config


def test_variant_config_applies_each_override_and_names_bad_ones():
    mixed = variant_config("bmojo/dtype=bfloat16/remat=block", d_model=64)
    assert (mixed.dtype, mixed.remat, mixed.d_model, mixed.pattern) == ("bfloat16", "block", 64,
                                                                       "B")
    assert variant_config("mamba/d_ff=0").hidden_dim == 0
    assert variant_config("bmojo/state").eidetic_selection == "state"
    assert variant_config("bmojo/eidetic_threshold=0.5").eidetic_threshold == 0.5
    for bad, message in [("bmojo/dtyp=bfloat16", r"'bmojo/dtyp=bfloat16': Unknown ModelConfig"),
                         ("bmojo/dtype=float16", r"dtype='float16': allowed values"),
                         ("bmojo/d_ff=-1", r"d_ff=-1: must be an integer >= 0"),
                         ("mamba2/d_ff=0", r"Unknown preset 'mamba2'")]:
        with pytest.raises(ValueError, match=message):
            variant_config(bad)
