"""The Pallas kernels' shared config (backends, tiles) and the whole model on them.

The kernels are tested with their ops: bmojo_jax/ops/attention/attention_test.py and
bmojo_jax/ops/ssm/ssm_test.py. On CPU the kernels run in interpret mode; with a GPU/TPU the same
tests run them compiled. Shapes are tiny because interpret mode is slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from pallas_kernels import config as cfg
from tests import helpers


def test_interpret_only_on_cpu():
    assert cfg.interpret() == (jax.default_backend() == "cpu")


def test_block_size_validation():
    with pytest.raises(ValueError, match="block_k=64: on TPU .* multiple of 128"):
        cfg.AttentionBlocks(block_q=128, block_k=64).validate("tpu")
    with pytest.raises(ValueError, match="block_q=12: on TPU .* multiple of 8"):
        cfg.AttentionBlocks(block_q=12, block_k=128, slot_multiple=128).validate("tpu")
    with pytest.raises(ValueError, match="chunk=48: on GPU .* power of two"):
        cfg.ScanBlocks(chunk=48, block_d=64).validate("gpu")
    with pytest.raises(ValueError, match="block_d=0"):
        cfg.ScanBlocks(chunk=16, block_d=0).validate("cpu")
    for name in cfg.BACKENDS:
        cfg.AttentionBlocks.default(name).validate(name)
        cfg.ScanBlocks.default(name).validate(name)


@pytest.mark.parametrize("ssm_kind", ["mamba2", pytest.param("mamba1", marks=pytest.mark.slow)])
def test_model_pallas_matches_xla(ssm_kind):
    """The `bmojo` preset (attention kernels, scan kernel, eidetic slots): same loss, logits and
    parameter gradients with implementation="pallas" as with "xla"."""
    x, y = helpers.tokens(4), helpers.tokens(5)

    def run(implementation):
        config = helpers.config("bmojo", implementation=implementation, ssm_kind=ssm_kind)
        model = bj.LanguageModel(config, rngs=nnx.Rngs(7))

        @nnx.jit
        def loss_and_grads(model):
            def loss(model):
                logits, aux = model.forward(x)
                ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))
                return ce + aux, logits
            (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
            return value, logits, nnx.state(grads, nnx.Param)

        return loss_and_grads(model)

    value, logits, grads = run("pallas")
    ref_value, ref_logits, ref_grads = run("xla")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert not np.any(np.isnan(g))
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
