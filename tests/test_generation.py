"""generate: bad arguments get a clear error naming the value, before anything is compiled."""

import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5: must be an integer"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(temperature=-1), "temperature=-1"),
    (dict(top_k=2.5), "top_k=2.5: must be an integer"),
    (dict(top_k=0), "top_k=0"),
])
def test_bad_arguments(kwargs, match):
    model = bj.LanguageModel(bj.ModelConfig.preset("swa", vocab_size=16, d_model=8, n_heads=2,
                                                   window=4, n_layers=1, ssm_head_dim=8), rngs=nnx.Rngs(0))
    args = dict(max_new_tokens=3, **kwargs) if "max_new_tokens" not in kwargs else kwargs
    with pytest.raises(ValueError, match=match):
        bj.generate(model, np.zeros((1, 4), np.int32), **args)
