"""`ops.ssd` and `ops.selective_scan`: every implementation against the float32 reference.

One test class, parametrised over the two ops and their implementations (`ssm.IMPLEMENTATIONS`, plus
the Pallas kernels with small tiles), shapes (t = 1; t = 37: odd, not a multiple of any chunk; a
wider head and state), dtypes and with / without an initial state. Gradients: the VJP of one random
cotangent on y and on the final state. The bfloat16 and sequence-splitting checks run every time
for the default implementation (`xla`) and in the slow run for the others (on CPU the Pallas
kernels run in interpret mode, which is slow).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import pytest

from bmojo_jax import ops
from bmojo_jax.ops import ssm
from pallas_kernels import config as pallas_config
from pallas_kernels import selective_scan as pallas_selective_scan
from pallas_kernels import ssd as pallas_ssd
from tests import helpers

B, H, P, N, D = 2, 2, 4, 3, 5
CHUNK = 8  # chunk_size of the xla implementations: t = 37 is 4 chunks and a partial one
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
# The kernels with tiles smaller than the CPU default: several chunks and channel blocks at t = 37.
SMALL_TILES = pallas_config.ScanBlocks(chunk=8, block_d=4)
IMPLEMENTATIONS = ssm.IMPLEMENTATIONS + ("pallas_small_tiles",)
COMPARED = [i for i in IMPLEMENTATIONS if i != "reference"]
SHAPES = {  # name: (t, with_h0, wide: head channels p = 8 and state n = 5)
    "t1_h0": (1, True, False),
    "t37": (37, False, False),
    "t37_h0_wide": (37, True, True),
}


def _ssd_inputs(t, with_h0, dtype=jnp.float32, wide=False):
    p, n = (8, 5) if wide else (P, N)
    k = helpers.keys(6)
    x = jax.random.normal(k[0], (B, t, H, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, H)))
    a = -jnp.exp(jax.random.normal(k[2], (H,)))
    Bm = jax.random.normal(k[3], (B, t, n)).astype(dtype)
    C = jax.random.normal(k[4], (B, t, n)).astype(dtype)
    h0 = jax.random.normal(k[5], (B, H, p, n)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


def _mamba1_inputs(t, with_h0, dtype=jnp.float32, wide=False):
    n = 5 if wide else N
    k = helpers.keys(6, seed=1)
    x = jax.random.normal(k[0], (B, t, D)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, D)))
    a = -jnp.exp(jax.random.normal(k[2], (D, n)))
    Bm = jax.random.normal(k[3], (B, t, n)).astype(dtype)
    C = jax.random.normal(k[4], (B, t, n)).astype(dtype)
    h0 = jax.random.normal(k[5], (B, D, n)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


OPS = {  # name: (the op, its Pallas kernel, inputs(t, with_h0, dtype, wide))
    "ssd": (ops.ssd, pallas_ssd.ssd, _ssd_inputs),
    "selective_scan": (ops.selective_scan, pallas_selective_scan.selective_scan, _mamba1_inputs),
}


def _implementation(op_name, implementation):
    """(x, dt, a, B, C, h0) -> (y, h_last) of one implementation of the op."""
    op, kernel, _ = OPS[op_name]
    if implementation == "pallas_small_tiles":
        return functools.partial(kernel, blocks=SMALL_TILES)
    return functools.partial(op, chunk_size=CHUNK, implementation=implementation)


def _closeness(dtype, t):
    """`check(actual, expected, grad)` for `helpers.assert_vjp_matches`.

    float32: within FWD_TOL / GRAD_TOL (relative and absolute) and within a few float32 epsilons
    growing as sqrt(t), relative to the largest value (outputs 2e-7 sqrt(t), gradients
    1e-5 sqrt(t): da and dt sum many terms that cancel). bfloat16 (inputs and y; the reference
    computes in float32 too): 2e-3 sqrt(t) / 3e-3 sqrt(t) relative to the largest value.
    """
    def check(actual, expected, grad):
        if dtype == jnp.float32:
            helpers.assert_allclose(actual, expected, GRAD_TOL if grad else FWD_TOL)
            helpers.assert_close_to_scale(actual, expected, (1e-5 if grad else 2e-7) * math.sqrt(t))
        else:
            helpers.assert_close_to_scale(actual, expected, (3e-3 if grad else 2e-3) * math.sqrt(t))
    return check


def _slow_unless_default(implementations):
    return [i if i == "xla" else pytest.param(i, marks=pytest.mark.slow) for i in implementations]


@pytest.mark.parametrize("op_name", list(OPS))
class TestScan:

    @pytest.mark.parametrize("shape", list(SHAPES))
    @pytest.mark.parametrize("implementation", COMPARED)
    def test_matches_reference(self, op_name, implementation, shape):
        """Outputs y, h_last and the gradients of all inputs."""
        t, with_h0, wide = SHAPES[shape]
        args = OPS[op_name][2](t, with_h0, jnp.float32, wide)
        helpers.assert_vjp_matches(_implementation(op_name, implementation),
                                   _implementation(op_name, "reference"), args,
                                   _closeness(jnp.float32, t))

    @pytest.mark.parametrize("implementation", _slow_unless_default(COMPARED))
    def test_bfloat16(self, op_name, implementation):
        """bfloat16 x, B, C: y in bfloat16, the state in float32, gradients in the inputs' dtypes,
        close to the reference on the same inputs."""
        t = 37
        args = OPS[op_name][2](t, True, jnp.bfloat16)
        (y, h_last), grads = helpers.assert_vjp_matches(
            _implementation(op_name, implementation), _implementation(op_name, "reference"), args,
            _closeness(jnp.bfloat16, t))
        assert y.dtype == jnp.bfloat16 and h_last.dtype == jnp.float32
        chex.assert_trees_all_equal_dtypes(grads, args)

    @pytest.mark.parametrize("implementation", _slow_unless_default(IMPLEMENTATIONS))
    def test_state_splits_sequence(self, op_name, implementation):
        """Scanning t tokens = scanning a prefix, then the rest from the prefix's final state."""
        t, split = 29, 20
        x, dt, a, Bm, C, _ = OPS[op_name][2](t, False)
        run = jax.jit(_implementation(op_name, implementation))
        y, h = run(x, dt, a, Bm, C, None)
        y1, h1 = run(x[:, :split], dt[:, :split], a, Bm[:, :split], C[:, :split], None)
        y2, h2 = run(x[:, split:], dt[:, split:], a, Bm[:, split:], C[:, split:], h1)
        _closeness(jnp.float32, t)((jnp.concatenate([y1, y2], 1), h2), (y, h), grad=False)

    @pytest.mark.parametrize("implementation", ["xla", "associative"])
    def test_segments_match_reference(self, op_name, implementation):
        """Packed documents (boundaries inside chunks, at a chunk boundary, two in a row), with
        an initial state: outputs and gradients against the reference."""
        t = 37
        args = OPS[op_name][2](t, True)
        segments = jnp.asarray([[0] * 5 + [1] * 11 + [2] + [3] * 20, [0] * 37])

        def scan(implementation):
            fn = _implementation(op_name, implementation)
            return lambda *a: fn(*a, segment_ids=segments)

        helpers.assert_vjp_matches(scan(implementation), scan("reference"), args,
                                   _closeness(jnp.float32, t))

    def test_segments_are_documents_one_by_one(self, op_name):
        """Two packed documents = each scanned alone (the second from a zero state, whatever the
        first left); the final state is the second document's."""
        t, start = 29, 12
        x, dt, a, Bm, C, h0 = OPS[op_name][2](t, True)
        segments = jnp.asarray((jnp.arange(t) >= start)[None].repeat(B, 0).astype(jnp.int32))
        run = _implementation(op_name, "xla")
        y, h = run(x, dt, a, Bm, C, h0, segment_ids=segments)
        y1, _ = run(x[:, :start], dt[:, :start], a, Bm[:, :start], C[:, :start], h0)
        y2, h2 = run(x[:, start:], dt[:, start:], a, Bm[:, start:], C[:, start:], None)
        _closeness(jnp.float32, t)((jnp.concatenate([y1, y2], 1), h2), (y, h), grad=False)
        with pytest.raises(ValueError, match="segment_ids has shape"):
            run(x, dt, a, Bm, C, h0, segment_ids=segments[:, :-1])

    def test_errors(self, op_name):
        op, _, make_inputs = OPS[op_name]
        x, dt, a, Bm, C, h0 = make_inputs(5, True)
        with pytest.raises(ValueError, match="implementation='nope'"):
            op(x, dt, a, Bm, C, implementation="nope")
        with pytest.raises(ValueError, match="h0 has shape"):
            op(x, dt, a, Bm, C, jnp.zeros((1, 1)))
        with pytest.raises(ValueError, match="Shapes disagree"):
            op(x, dt[:, :4], a, Bm, C, h0)

    @pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
    def test_pallas_lowers_for_accelerators(self, op_name, monkeypatch, backend, platform):
        """Forward and backward of the kernel lower (Pallas -> Mosaic TPU / Triton IR, with that
        backend's default tiles and compiler params) without the device. Compiling for the
        device still needs one."""
        monkeypatch.setattr(pallas_config, "backend", lambda: backend)
        b, t, h, n, d = 1, 256, 2, 64, 128
        ones = lambda *shape: jnp.ones(shape, jnp.bfloat16)  # noqa: E731
        if op_name == "ssd":
            args = (ones(b, t, h, 64), jnp.ones((b, t, h)), -jnp.ones(h), ones(b, t, n),
                    ones(b, t, n))
        else:
            args = (ones(b, t, d), jnp.ones((b, t, d)), -jnp.ones((d, 16)), ones(b, t, 16),
                    ones(b, t, 16))
        helpers.lower_with_gradients(OPS[op_name][1], args, platform)
