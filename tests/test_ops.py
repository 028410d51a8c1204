"""Attention ops vs their references: forward and gradients, odd lengths.

The other ops' suites live next to them: bmojo_jax/ops/<op>/<op>_test.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax import ops
from tests.helpers import assert_allclose, keys, vjp_all

B, H, E = 2, 2, 8
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- attention


def _attention_inputs(t):
    k = keys(5, seed=2)
    return [jax.random.normal(kk, (B, t, H, E)) for kk in k]


def _memory(t, window, slots=4, seed=3):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (B, t))
    return ops.select_eidetic(scores, window=window, per_chunk=2, slots=slots, lag=2,
                              implementation="reference")


ATTENTION_CASES = {
    "full": dict(window=None),
    "window": dict(window=6),
    "window_longer_than_t": dict(window=50),
    "fading": dict(window=6, fading=True),
    "bmojo": dict(window=6, fading=True, memory=True),
    "bmojo_small_window": dict(window=4, fading=True, memory=True),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("t", [13, 37])
def test_memory_attention_matches_reference(case, t):
    spec = ATTENTION_CASES[case]
    q, k, v, kf, vf = _attention_inputs(t)
    window = spec["window"]
    memory = _memory(t, window) if spec.get("memory") else None
    fading = spec.get("fading", False)
    args = (q, k, v, kf if fading else None, vf if fading else None)

    def run(impl):
        def fn(q, k, v, kf, vf):
            return ops.memory_attention(q, k, v, window=window, k_fading=kf, v_fading=vf,
                                        memory_positions=memory, implementation=impl)
        return fn

    out, grads = vjp_all(run("xla"), args)
    ref_out, ref_grads = vjp_all(run("reference"), args)
    assert_allclose(out, ref_out, FWD_TOL)
    assert_allclose(grads, ref_grads, GRAD_TOL)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_attention_special_cases(implementation):
    t, w = 37, 6
    q, k, v, kf, vf = _attention_inputs(t)

    def attn(**kw):
        return ops.memory_attention(q, k, v, implementation=implementation, **kw)

    # Window >= t is full causal attention.
    assert_allclose(attn(window=t), attn(window=None), FWD_TOL)
    # Empty eidetic memory is B'MOJO-F; B'MOJO-F without fading keys is sliding-window attention.
    empty = jnp.full((B, -(-t // w), 4), -1, jnp.int32)
    bmojo_f = attn(window=w, k_fading=kf, v_fading=vf)
    assert_allclose(attn(window=w, k_fading=kf, v_fading=vf, memory_positions=empty), bmojo_f,
                    FWD_TOL)
    assert not np.allclose(bmojo_f, attn(window=w))


def test_attention_is_causal_inkeys():
    """Perturbing keys/values at position p changes no output before p (all key groups)."""
    t, w, p = 37, 6, 20
    q, k, v, kf, vf = _attention_inputs(t)
    memory = _memory(t, w)

    def attn(k, v, kf, vf):
        return ops.memory_attention(q, k, v, window=w, k_fading=kf, v_fading=vf,
                                    memory_positions=memory, implementation="xla")

    bump = lambda x: x.at[:, p].add(1.0)  # noqa: E731
    before, after = attn(k, v, kf, vf), attn(bump(k), bump(v), bump(kf), bump(vf))
    np.testing.assert_array_equal(before[:, :p], after[:, :p])
    assert not np.allclose(before[:, p], after[:, p])


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends on i - j only."""
    q, k = _attention_inputs(1)[:2]

    def score(i, j):
        return jnp.sum(ops.rope(q, jnp.array([i])) * ops.rope(k, jnp.array([j])))

    np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
    assert not np.isclose(score(5, 2), score(5, 3))


def test_attention_errors():
    q, k, v, kf, vf = _attention_inputs(9)
    with pytest.raises(ValueError, match="window=0"):
        ops.memory_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="both k_fading and v_fading"):
        ops.memory_attention(q, k, v, window=4, k_fading=kf)
    with pytest.raises(ValueError, match="finite window"):
        ops.memory_attention(q, k, v, k_fading=kf, v_fading=vf)
    with pytest.raises(ValueError, match="memory_positions has shape"):
        ops.memory_attention(q, k, v, window=4, memory_positions=jnp.zeros((B, 2, 4), jnp.int32))


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("case", ["full", "window", "bmojo"])
def test_memory_attention_with_a_key_prefix_is_a_slice_of_the_whole(implementation, case):
    """Queries of tokens [s, s + L) with the P keys before them as a prefix (how sequence
    parallelism calls the op) = rows [s, s + L) of the attention over the whole sequence;
    eidetic slots then index into the keys [prefix; own]."""
    t, w, start, length = 24, 4, 12, 8
    q, k, v, kf, vf = _attention_inputs(t)
    spec = ATTENTION_CASES[case]
    window = None if spec["window"] is None else w
    memory = _memory(t, w) if spec.get("memory") else None
    fading = dict(k_fading=kf, v_fading=vf) if spec.get("fading") else {}
    whole = ops.memory_attention(q, k, v, window=window, memory_positions=memory,
                                 implementation=implementation, **fading)
    prefix = start  # every earlier key (a multiple of w), so that every slot is among them
    keys_ = slice(start - prefix, start + length)
    part = ops.memory_attention(
        q[:, start:start + length], k[:, keys_], v[:, keys_], window=window,
        memory_positions=None if memory is None else jnp.where(
            memory[:, start // w:(start + length) // w] >= 0,
            memory[:, start // w:(start + length) // w] - (start - prefix), -1),
        q_start=start, implementation=implementation,
        **{name: a[:, keys_] for name, a in fading.items()})
    assert_allclose(part, whole[:, start:start + length], FWD_TOL)


def test_memory_attention_prefix_keys_before_position_zero_are_invisible():
    """A prefix of keys at negative positions (shard 0 of a sequence-parallel run) is masked."""
    q, k, v, kf, vf = _attention_inputs(8)
    junk = [jnp.full_like(a, 100.0)[:, :8] for a in (k, v, kf, vf)]
    plain = ops.memory_attention(q, k, v, window=4, k_fading=kf, v_fading=vf)
    padded = ops.memory_attention(
        q, *(jnp.concatenate([j, a], axis=1) for j, a in zip(junk[:2], (k, v))), window=4,
        k_fading=jnp.concatenate([junk[2], kf], axis=1),
        v_fading=jnp.concatenate([junk[3], vf], axis=1), q_start=0)
    assert_allclose(padded, plain, FWD_TOL)


@pytest.mark.parametrize("case", ["full", "window", "fading", "bmojo"])
def test_attention_mass_matches_reference(case):
    """`return_mass`: the weight of each query on the window, fading and eidetic keys (xla =
    reference; rows sum to 1; groups a case lacks get 0)."""
    t = 13
    spec = ATTENTION_CASES[case]
    q, k, v, kf, vf = _attention_inputs(t)
    kw = dict(window=spec["window"], memory_positions=_memory(t, spec["window"])
              if spec.get("memory") else None)
    if spec.get("fading"):
        kw.update(k_fading=kf, v_fading=vf)
    out, mass = ops.memory_attention(q, k, v, return_mass=True, implementation="xla", **kw)
    ref_out, ref_mass = ops.memory_attention(q, k, v, return_mass=True,
                                             implementation="reference", **kw)
    assert_allclose(out, ref_out, FWD_TOL)
    assert_allclose(mass, ref_mass, FWD_TOL)
    assert mass.shape == (B, t, 3)
    np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-5)
    assert (not spec.get("fading") or float(mass[..., 1].max()) > 0) and (
        spec.get("memory") or float(np.abs(mass[..., 2]).max()) == 0)
