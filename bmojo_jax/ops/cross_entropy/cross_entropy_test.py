"""`ops.linear_cross_entropy`: every implementation against the float32 reference.

One test class, parametrised over the implementations (`cross_entropy.IMPLEMENTATIONS`), lengths
(t = 1; t = 13, not a multiple of the chunk) and chunk sizes (1 step, several chunks with a partial
one, one chunk longer than t), dtypes and weights (float with ignored tokens; a bool mask).
Gradients: the VJP of a random cotangent, through a non-linear use of the loss (sin), w.r.t. hidden,
head and token_weights.
"""

import jax
import jax.numpy as jnp
import pytest

from bmojo_jax import ops
from bmojo_jax.ops import cross_entropy
from tests import helpers

B, E, VOCAB = 2, 8, 11
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
BFLOAT16_GRAD_TOL = 2e-2  # the gradients are rounded to bfloat16 (8 bits of mantissa)
COMPARED = [i for i in cross_entropy.IMPLEMENTATIONS if i != "reference"]


def _inputs(t):
    k = helpers.keys(4, seed=5)
    hidden = jax.random.normal(k[0], (B, t, E))
    head = jax.random.normal(k[1], (VOCAB, E))
    targets = jax.random.randint(k[2], (B, t), 0, VOCAB)
    weights = jax.random.uniform(k[3], (B, t)) * (jnp.arange(t) % 3 != 1)  # some tokens ignored
    return hidden, head, targets, weights


def _check(tol_fwd, tol_grad):
    def check(actual, expected, grad):
        helpers.assert_allclose(actual, expected, tol_grad if grad else tol_fwd)
    return check


class TestLinearCrossEntropy:

    @pytest.mark.parametrize("t,chunk_size", [(1, 4), (13, 1), (13, 6), (13, 64)])
    @pytest.mark.parametrize("implementation", COMPARED)
    def test_matches_reference(self, implementation, t, chunk_size):
        hidden, head, targets, weights = _inputs(t)

        def run(impl):  # a non-linear use of the loss, so the cotangent is not 1
            return lambda h, w, ws: jnp.sin(ops.linear_cross_entropy(
                h, w, targets, ws, chunk_size=chunk_size, implementation=impl))

        helpers.assert_vjp_matches(run(implementation), run("reference"),
                                   (hidden, head, weights), _check(FWD_TOL, GRAD_TOL))
        primal = ops.linear_cross_entropy(hidden, head, targets, weights, chunk_size=chunk_size,
                                          implementation=implementation)
        reference = ops.linear_cross_entropy(hidden, head, targets, weights,
                                             implementation="reference")
        helpers.assert_allclose(primal, reference, FWD_TOL)  # the primal pass, without gradients

    @pytest.mark.parametrize("implementation", COMPARED)
    def test_bfloat16_and_bool_weights(self, implementation):
        """bfloat16 features and head, boolean token weights: gradients in the inputs' dtypes, equal
        to the reference's."""
        hidden, head, targets, token_weights = _inputs(13)
        hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
        mask = token_weights > 0

        def grads(impl):
            def loss(h, w):
                return ops.linear_cross_entropy(h, w, targets, mask, chunk_size=6,
                                                implementation=impl)
            return jax.grad(loss, argnums=(0, 1))(hidden, head)

        out, ref = grads(implementation), grads("reference")
        assert [g.dtype for g in out] == [jnp.bfloat16, jnp.bfloat16]
        helpers.assert_allclose([g.astype(jnp.float32) for g in out],
                                [g.astype(jnp.float32) for g in ref], BFLOAT16_GRAD_TOL)

    @pytest.mark.parametrize("implementation", cross_entropy.IMPLEMENTATIONS)
    def test_errors(self, implementation):
        hidden, head, targets, weights = _inputs(5)

        def loss(*args, **kwargs):
            return ops.linear_cross_entropy(*args, implementation=implementation, **kwargs)

        with pytest.raises(ValueError, match=r"head must be \[vocab, 8\]"):
            loss(hidden, head.T, targets, weights)
        with pytest.raises(ValueError, match="targets"):
            loss(hidden, head, targets[:, :2], weights)
        with pytest.raises(ValueError, match="chunk_size=0"):
            loss(hidden, head, targets, weights, chunk_size=0)

    def test_unavailable_implementation(self):
        hidden, head, targets, weights = _inputs(5)
        with pytest.raises(ValueError, match="implementation='pallas'"):
            ops.linear_cross_entropy(hidden, head, targets, weights, implementation="pallas")
