"""The canonical-form realization: shift = window of the last n inputs; diagonal = selective SSM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmojo_jax import ops
from bmojo_jax.layers import CanonicalRealization

T, D = 11, 4


@pytest.fixture(scope="module")
def inputs():
    return jax.random.normal(jax.random.PRNGKey(0), (2, T, D))


@pytest.mark.parametrize("sequential", [False, True])
def test_pure_shift_holds_the_last_n_inputs(inputs, sequential):
    n = 3
    model = CanonicalRealization(D, n_shift=n, d_state=0, rngs=nnx.Rngs(0))
    window, _, _ = model(inputs, sequential=sequential)
    padded = jnp.pad(inputs, [(0, 0), (n - 1, 0), (0, 0)])
    expected = jnp.stack([padded[:, t:t + n] for t in range(T)], axis=1)  # oldest first
    np.testing.assert_array_equal(window, expected)
    assert np.all(np.linalg.matrix_power(np.asarray(model.companion()), n) == 0)  # nilpotent


def test_feedback_makes_it_fade_and_scans_agree(inputs):
    model = CanonicalRealization(D, n_shift=3, d_state=2, feedback=True, rngs=nnx.Rngs(0))
    model.feedback[...] = jnp.array([0.1, -0.2, 0.5])
    parallel = model(inputs)
    sequential = model(inputs, sequential=True)
    for a, b in zip(parallel, sequential):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # With feedback the newest slot is no longer the input: memory is no longer verbatim.
    assert not np.allclose(parallel[0][:, :, -1], inputs)


def test_diagonal_block_is_the_selective_ssm(inputs):
    model = CanonicalRealization(D, n_shift=0, d_state=3, rngs=nnx.Rngs(1))
    _, fading, y = model(inputs)
    dt, a, Bm, C = model.selective_inputs(inputs)
    y_ref, h_ref = ops.selective_scan(inputs, dt, a, Bm, C, implementation="reference")
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fading[:, -1], h_ref, rtol=1e-5, atol=1e-5)


def test_bad_sizes():
    with pytest.raises(ValueError, match="n_shift=0, d_state=0"):
        CanonicalRealization(D, n_shift=0, d_state=0, rngs=nnx.Rngs(0))
