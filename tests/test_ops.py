"""Ops vs their references: forward and gradients, odd lengths, with and without initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax import ops

B, H, P, N, D, E = 2, 2, 4, 3, 5, 8
CHUNK = 8
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def keys(n, seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _ssd_inputs(t, with_h0):
    k = keys(6)
    x = jax.random.normal(k[0], (B, t, H, P))
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, H)))
    a = -jnp.exp(jax.random.normal(k[2], (H,)))
    Bm, C = jax.random.normal(k[3], (B, t, N)), jax.random.normal(k[4], (B, t, N))
    h0 = jax.random.normal(k[5], (B, H, P, N)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


def _mamba1_inputs(t, with_h0):
    k = keys(6, seed=1)
    x = jax.random.normal(k[0], (B, t, D))
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, D)))
    a = -jnp.exp(jax.random.normal(k[2], (D, N)))
    Bm, C = jax.random.normal(k[3], (B, t, N)), jax.random.normal(k[4], (B, t, N))
    h0 = jax.random.normal(k[5], (B, D, N)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


def vjp_all(fn, args, seed=7):
    """Outputs and the gradients of <cotangent, outputs> w.r.t. every non-None input."""
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*live):
        full = list(args)
        for i, a in zip(idx, live):
            full[i] = a
        return fn(*full)

    out, vjp = jax.vjp(jax.jit(f), *[args[i] for i in idx])
    leaves, treedef = jax.tree.flatten(out)
    cot = treedef.unflatten([jax.random.normal(k, o.shape, jnp.float32).astype(o.dtype)
                             for o, k in zip(leaves, keys(len(leaves), seed))])
    return out, vjp(cot)


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert not np.any(np.isnan(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=tol, atol=tol)


SCANS = [(ops.ssd, _ssd_inputs), (ops.selective_scan, _mamba1_inputs)]


@pytest.mark.parametrize("scan,make_inputs", SCANS, ids=["ssd", "selective_scan"])
@pytest.mark.parametrize("implementation", ["xla", "associative"])
@pytest.mark.parametrize("t,with_h0", [(1, True), (37, False), (37, True)])
def test_scan_matches_reference(scan, make_inputs, implementation, t, with_h0):
    args = make_inputs(t, with_h0)

    def run(impl):
        return lambda *a: scan(*a, chunk_size=CHUNK, implementation=impl)

    out, grads = vjp_all(run(implementation), args)
    ref_out, ref_grads = vjp_all(run("reference"), args)
    _assert_close(out, ref_out, FWD_TOL)
    _assert_close(grads, ref_grads, GRAD_TOL)


def test_scan_state_splits_sequence():
    """Scanning t tokens equals scanning a prefix, then the rest from the prefix's final state."""
    x, dt, a, Bm, C, _ = _ssd_inputs(37, False)
    y, h = ops.ssd(x, dt, a, Bm, C, chunk_size=CHUNK)
    y1, h1 = ops.ssd(x[:, :20], dt[:, :20], a, Bm[:, :20], C[:, :20], chunk_size=CHUNK)
    y2, h2 = ops.ssd(x[:, 20:], dt[:, 20:], a, Bm[:, 20:], C[:, 20:], h1, chunk_size=CHUNK)
    _assert_close(jnp.concatenate([y1, y2], 1), y, FWD_TOL)
    _assert_close(h2, h, FWD_TOL)


def test_scan_errors():
    x, dt, a, Bm, C, _ = _ssd_inputs(5, False)
    with pytest.raises(ValueError, match="implementation='nope'"):
        ops.ssd(x, dt, a, Bm, C, implementation="nope")
    with pytest.raises(ValueError, match="h0 has shape"):
        ops.ssd(x, dt, a, Bm, C, jnp.zeros((1, 1)))


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
    _assert_close(out, ref_out, FWD_TOL)
    _assert_close(grads, ref_grads, GRAD_TOL)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_attention_special_cases(implementation):
    t, w = 37, 6
    q, k, v, kf, vf = _attention_inputs(t)

    def attn(**kw):
        return ops.memory_attention(q, k, v, implementation=implementation, **kw)

    # Window >= t is full causal attention.
    _assert_close(attn(window=t), attn(window=None), FWD_TOL)
    # Empty eidetic memory is B'MOJO-F; B'MOJO-F without fading keys is sliding-window attention.
    empty = jnp.full((B, -(-t // w), 4), -1, jnp.int32)
    bmojo_f = attn(window=w, k_fading=kf, v_fading=vf)
    _assert_close(attn(window=w, k_fading=kf, v_fading=vf, memory_positions=empty), bmojo_f, FWD_TOL)
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


def _cross_entropy_inputs(t, vocab=11):
    k = keys(4, seed=5)
    hidden = jax.random.normal(k[0], (B, t, E))
    weight = jax.random.normal(k[1], (vocab, E))
    targets = jax.random.randint(k[2], (B, t), 0, vocab)
    weights = jax.random.uniform(k[3], (B, t)) * (jnp.arange(t) % 3 != 1)  # some tokens ignored
    return hidden, weight, targets, weights


@pytest.mark.parametrize("t,chunk_size", [(1, 4), (13, 1), (13, 6), (13, 64)])
def test_linear_cross_entropy_matches_reference(t, chunk_size):
    hidden, weight, targets, weights = _cross_entropy_inputs(t)

    def run(impl):  # a non-linear use of the loss, so the cotangent is not 1
        return lambda h, w, ws: jnp.sin(ops.linear_cross_entropy(
            h, w, targets, ws, chunk_size=chunk_size, implementation=impl))

    out, grads = vjp_all(run("xla"), (hidden, weight, weights))
    ref_out, ref_grads = vjp_all(run("reference"), (hidden, weight, weights))
    _assert_close(out, ref_out, FWD_TOL)
    _assert_close(grads, ref_grads, GRAD_TOL)
    plain = ops.linear_cross_entropy(hidden, weight, targets, weights, chunk_size=chunk_size)
    reference = ops.linear_cross_entropy(hidden, weight, targets, weights,
                                         implementation="reference")
    _assert_close(plain, reference, FWD_TOL)  # the primal pass, without gradients


def test_linear_cross_entropy_dtypes():
    """bfloat16 features and head, boolean token weights: gradients in the inputs' dtypes, equal
    to the reference's."""
    hidden, head, targets, token_weights = _cross_entropy_inputs(13)
    hidden, head = hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
    mask = token_weights > 0

    def grads(impl):
        return jax.grad(lambda h, w: ops.linear_cross_entropy(h, w, targets, mask, chunk_size=6,
                                                              implementation=impl),
                        argnums=(0, 1))(hidden, head)

    out, ref = grads("xla"), grads("reference")
    assert [g.dtype for g in out] == [jnp.bfloat16, jnp.bfloat16]
    _assert_close([g.astype(jnp.float32) for g in out], [g.astype(jnp.float32) for g in ref], 2e-2)


def test_linear_cross_entropy_errors():
    hidden, weight, targets, weights = _cross_entropy_inputs(5)
    with pytest.raises(ValueError, match=r"head must be \[vocab, 8\]"):
        ops.linear_cross_entropy(hidden, weight.T, targets, weights)
    with pytest.raises(ValueError, match="targets"):
        ops.linear_cross_entropy(hidden, weight, targets[:, :2], weights)
    with pytest.raises(ValueError, match="chunk_size=0"):
        ops.linear_cross_entropy(hidden, weight, targets, weights, chunk_size=0)
    with pytest.raises(ValueError, match="implementation='pallas'"):
        ops.linear_cross_entropy(hidden, weight, targets, weights, implementation="pallas")
