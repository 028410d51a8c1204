"""Pallas kernels vs the reference ops: forward and every gradient, odd lengths, several tiles.

On CPU the kernels run in interpret mode; with a GPU/TPU the same tests run them compiled.
Shapes are tiny because interpret mode is slow. Tolerances scale with sqrt(reduction length) and
the dtype's epsilon, relative to the largest reference value.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax import ops
from pallas_kernels import config as cfg
from pallas_kernels import memory_attention as pallas_attention
from pallas_kernels import selective_scan as pallas_scan
from pallas_kernels import ssd as pallas_ssd
from tests.test_ops import keys, vjp_all

B, H, P, N, D, E = 2, 2, 4, 3, 5, 8


def _tolerance(dtype, length, grad=False):
    """Relative tolerance: a few float32 epsilons or bfloat16 roundings, growing as sqrt(length).
    Gradients get more room: da and dt sum many terms that cancel."""
    forward, backward = {jnp.float32: (2e-7, 1e-5), jnp.bfloat16: (2e-3, 3e-3)}[
        jnp.dtype(dtype).type]
    return (backward if grad else forward) * math.sqrt(length)


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert a.shape == e.shape
        assert not np.any(np.isnan(a)), "NaN in the kernel's result"
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale)


def test_interpret_only_on_cpu():
    assert cfg.interpret() == (jax.default_backend() == "cpu")


# ----------------------------------------------------------------------------- scans


def _ssd_inputs(t, with_h0, dtype=jnp.float32, p=P, n=N):
    k = keys(6)
    x = jax.random.normal(k[0], (B, t, H, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, H)))
    a = -jnp.exp(jax.random.normal(k[2], (H,)))
    Bm = jax.random.normal(k[3], (B, t, n)).astype(dtype)
    C = jax.random.normal(k[4], (B, t, n)).astype(dtype)
    h0 = jax.random.normal(k[5], (B, H, p, n)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


def _mamba1_inputs(t, with_h0, dtype=jnp.float32, d=D, n=N):
    k = keys(6, seed=1)
    x = jax.random.normal(k[0], (B, t, d)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(k[1], (B, t, d)))
    a = -jnp.exp(jax.random.normal(k[2], (d, n)))
    Bm = jax.random.normal(k[3], (B, t, n)).astype(dtype)
    C = jax.random.normal(k[4], (B, t, n)).astype(dtype)
    h0 = jax.random.normal(k[5], (B, d, n)) if with_h0 else None
    return (x, dt, a, Bm, C, h0)


SCAN_CASES = {  # name: (kind, t, with_h0, blocks, extra sizes)
    "ssd_t1": ("ssd", 1, True, None, {}),
    "ssd_t37": ("ssd", 37, False, None, {}),
    "ssd_t37_h0_chunk8_p8_n5": ("ssd", 37, True, cfg.ScanBlocks(chunk=8, block_d=8),
                                dict(p=8, n=5)),
    "mamba1_t1": ("selective_scan", 1, True, None, {}),
    "mamba1_t37": ("selective_scan", 37, False, None, {}),
    "mamba1_t37_h0_chunk8_bd4_n5": ("selective_scan", 37, True,
                                    cfg.ScanBlocks(chunk=8, block_d=4), dict(n=5)),
}


def _scan_fns(kind):
    if kind == "ssd":
        return pallas_ssd.ssd, ops.ssd, _ssd_inputs
    return pallas_scan.selective_scan, ops.selective_scan, _mamba1_inputs


def _check_scan(kind, t, with_h0, blocks, sizes, dtype):
    kernel, op, make_inputs = _scan_fns(kind)
    args = make_inputs(t, with_h0, dtype, **sizes)
    out, grads = vjp_all(lambda *a: kernel(*a, blocks=blocks), args)
    ref_out, ref_grads = vjp_all(lambda *a: op(*a, implementation="reference"), args)
    assert out[0].dtype == dtype and out[1].dtype == jnp.float32
    _assert_close(out, ref_out, _tolerance(dtype, t))
    _assert_close(grads, ref_grads, _tolerance(dtype, t, grad=True))


@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_scan_kernel_matches_reference(case):
    """Outputs y, h_last and the gradients of all inputs (cotangents on y and on h_last)."""
    kind, t, with_h0, blocks, sizes = SCAN_CASES[case]
    _check_scan(kind, t, with_h0, blocks, sizes, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ssd", "selective_scan"])
def test_scan_kernel_bfloat16(kind):
    _check_scan(kind, 37, True, None, {}, jnp.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("op,make_inputs", [(ops.ssd, _ssd_inputs),
                                            (ops.selective_scan, _mamba1_inputs)],
                         ids=["ssd", "selective_scan"])
def test_scan_op_pallas_state_splits_sequence(op, make_inputs):
    """Through the op: scanning t tokens = a prefix, then the rest from the prefix's state."""
    x, dt, a, Bm, C, _ = make_inputs(29, False)
    run = lambda *u: op(*u, implementation="pallas")  # noqa: E731
    y, h = jax.jit(run)(x, dt, a, Bm, C, None)
    y1, h1 = jax.jit(run)(x[:, :20], dt[:, :20], a, Bm[:, :20], C[:, :20], None)
    y2, h2 = jax.jit(run)(x[:, 20:], dt[:, 20:], a, Bm[:, 20:], C[:, 20:], h1)
    _assert_close((jnp.concatenate([y1, y2], 1), h2), (y, h), _tolerance(jnp.float32, 29))


# ----------------------------------------------------------------------------- attention


def _attention_inputs(t, dtype=jnp.float32):
    return [jax.random.normal(k, (B, t, H, E)).astype(dtype) for k in keys(5, seed=2)]


def _memory(t, window, per_chunk=2, slots=4, seed=3):
    scores = jax.random.normal(jax.random.PRNGKey(seed), (B, t))
    return ops.select_eidetic(scores, window=window, per_chunk=per_chunk, slots=slots, lag=2,
                              implementation="reference")


SMALL_TILES = cfg.AttentionBlocks(block_q=8, block_k=16, slot_multiple=4)
ATTENTION_CASES = {  # name: (t, window, fading, memory (per_chunk, slots), blocks)
    "full_t13": (13, None, False, None, None),
    "full_t37_q8_k16": (37, None, False, None, SMALL_TILES),
    "window6": (37, 6, False, None, None),
    "window_longer_than_t": (37, 50, False, None, None),
    "fading6": (37, 6, True, None, None),
    "bmojo6": (37, 6, True, (2, 4), None),
    "bmojo4_q8_k16_slots3": (37, 4, True, (1, 3), SMALL_TILES),
    "bmojo20_window_wider_than_blocks": (40, 20, True, (2, 6), None),
}
SLOW_CASES = ("window_longer_than_t",)  # the op turns it into full attention: an extra check


def _check_attention(t, window, fading, memory, blocks, dtype):
    q, k, v, kf, vf = _attention_inputs(t, dtype)
    positions = _memory(t, window, *memory) if memory else None
    args = (q, k, v, kf if fading else None, vf if fading else None)

    def run(impl):
        def fn(q, k, v, kf, vf):
            if impl == "kernel":  # the pallas kernel with explicit tiles (window resolved)
                return pallas_attention.memory_attention(q, k, v, kf, vf, positions, window or t,
                                                         blocks=blocks)
            return ops.memory_attention(q, k, v, window=window, k_fading=kf, v_fading=vf,
                                        memory_positions=positions, implementation=impl)
        return fn

    out, grads = vjp_all(run("kernel" if blocks else "pallas"), args)
    ref_out, ref_grads = vjp_all(run("reference"), args)
    assert out.dtype == jnp.float32
    keys = min(t, 2 * (window or t)) + (memory[1] if memory else 0)  # softmax length (at most)
    _assert_close(out, ref_out, _tolerance(dtype, keys))
    _assert_close(grads, ref_grads, _tolerance(dtype, keys, grad=True))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES
                                  else c for c in ATTENTION_CASES])
def test_attention_kernel_matches_reference(case):
    _check_attention(*ATTENTION_CASES[case], jnp.float32)


@pytest.mark.slow
def test_attention_kernel_bfloat16():
    _check_attention(37, 6, True, (2, 4), None, jnp.bfloat16)


def test_attention_kernel_visits_only_visible_key_blocks():
    """The forward's loops cover key blocks of chunks c-1, c (window) and c-2, c-1 (fading) only,
    and the backward's loops the transposed ranges: counted on a long sequence."""
    w, t, blocks = 32, 1024, cfg.AttentionBlocks(block_q=16, block_k=16)
    st = pallas_attention._Static(window=w, fading=True, memory=False, n_chunks=t // w,
                                  padded_length=t, scale=1.0, blocks=blocks)
    for _, lo, hi in pallas_attention._groups(st):
        for q_block in range(st.n_q):
            first, end = (int(i) for i in pallas_attention._key_blocks(q_block * 16, st, lo, hi))
            assert end - first <= (w + 16) // 16  # 3 blocks of 16 for a window of 32
            q_chunk = q_block * 16 // w
            lowest_chunk = q_chunk - (2 if lo else 1)
            assert first * 16 >= max(lowest_chunk, 0) * w and (end - 1) * 16 // w <= q_chunk
        for k_block in range(st.n_k):
            first, end = (int(i) for i in pallas_attention._query_blocks(k_block * 16, st, lo, hi))
            assert end - first <= (w + 16) // 16  # empty (end <= first) past the last query


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


@pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_accelerators(monkeypatch, backend, platform):
    """Forward and backward of every kernel lower (Pallas -> Mosaic TPU / Triton IR, with that
    backend's default tiles and compiler params) without the device: catches primitives the
    backend cannot lower. Compiling for the device still needs one."""
    monkeypatch.setattr(cfg, "backend", lambda: backend)
    b, t, h, e, n, d = 1, 256, 2, 128, 64, 128
    ones = lambda *shape: jnp.ones(shape, jnp.bfloat16)  # noqa: E731
    q = ones(b, t, h, e)
    memory = jnp.zeros((b, t // 128, 8), jnp.int32)
    cases = [
        (lambda *a: pallas_ssd.ssd(*a), (ones(b, t, h, 64), jnp.ones((b, t, h)), -jnp.ones(h),
                                          ones(b, t, n), ones(b, t, n))),
        (lambda *a: pallas_scan.selective_scan(*a),
         (ones(b, t, d), jnp.ones((b, t, d)), -jnp.ones((d, 16)), ones(b, t, 16),
          ones(b, t, 16))),
        (lambda q, k, v: pallas_attention.memory_attention(q, k, v, None, None, None, t),
         (q, q, q)),
        (lambda *a: pallas_attention.memory_attention(*a, memory, 128), (q,) * 5),
    ]
    for fn, args in cases:
        def loss(*a, fn=fn):
            return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*a)))
        for f in (fn, jax.grad(loss, argnums=tuple(range(len(args))))):
            jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("ssm_kind", ["mamba2", pytest.param("mamba1", marks=pytest.mark.slow)])
def test_model_pallas_matches_xla(ssm_kind):
    """The `bmojo` preset (attention kernels, scan kernel, eidetic slots): same loss, logits and
    parameter gradients with implementation="pallas" as with "xla"."""
    t, vocab = 29, 50
    small = dict(vocab_size=vocab, d_model=16, n_heads=2, window=4, d_state=4, ssm_head_dim=8,
                 chunk_size=8, eidetic_per_chunk=1, eidetic_slots=3)
    x, y = (jax.random.randint(jax.random.PRNGKey(s), (2, t), 0, vocab) for s in (4, 5))

    def run(implementation):
        config = bj.ModelConfig.preset("bmojo", implementation=implementation,
                                       ssm_kind=ssm_kind, **small)
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
