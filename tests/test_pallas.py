"""Pallas kernels vs the reference ops: forward and every gradient, odd lengths, several tiles.

The attention kernel and the shared config (tiles, backends) are tested here; the scan kernels with
their ops, in bmojo_jax/ops/ssm/ssm_test.py.

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
from tests.helpers import assert_close_to_scale, keys, lower_with_gradients, vjp_all

B, H, E = 2, 2, 8


def _tolerance(dtype, length, grad=False):
    """Relative tolerance: a few float32 epsilons or bfloat16 roundings, growing as sqrt(length).
    Gradients get more room: da and dt sum many terms that cancel."""
    forward, backward = {jnp.float32: (2e-7, 1e-5), jnp.bfloat16: (2e-3, 3e-3)}[
        jnp.dtype(dtype).type]
    return (backward if grad else forward) * math.sqrt(length)


def test_interpret_only_on_cpu():
    assert cfg.interpret() == (jax.default_backend() == "cpu")


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
    assert_close_to_scale(out, ref_out, _tolerance(dtype, keys))
    assert_close_to_scale(grads, ref_grads, _tolerance(dtype, keys, grad=True))


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
    """Forward and backward of the attention kernels lower (Pallas -> Mosaic TPU / Triton IR, with
    that backend's default tiles and compiler params) without the device: catches primitives the
    backend cannot lower. Compiling for the device still needs one."""
    monkeypatch.setattr(cfg, "backend", lambda: backend)
    b, t, h, e = 1, 256, 2, 128
    q = jnp.ones((b, t, h, e), jnp.bfloat16)
    memory = jnp.zeros((b, t // 128, 8), jnp.int32)
    cases = [
        (lambda q, k, v: pallas_attention.memory_attention(q, k, v, None, None, None, t),
         (q, q, q)),
        (lambda *a: pallas_attention.memory_attention(*a, memory, 128), (q,) * 5),
    ]
    for fn, args in cases:
        lower_with_gradients(fn, args, platform)


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
