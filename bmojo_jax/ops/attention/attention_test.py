"""`ops.memory_attention`, `ops.attend_one`, `ops.rope`, and the Pallas attention kernels.

One test class for `memory_attention`. `test_matches_reference` runs every implementation against
the float32 reference (outputs, and the VJP of one random cotangent w.r.t. q, k, v and the fading
keys/values) on the key groups (full, window, window longer than t, fading, B'MOJO) at lengths
that are no multiple of the tiles (t = 13, 37, 40) nor, but for t = 40, of the window. `xla` runs
on every case; the Pallas kernels, in interpret mode on CPU (seconds per case), on the cases that
cover their paths, with the CPU default tiles (`pallas`) or smaller ones (`pallas_small_tiles`:
several query and key blocks, a slot axis padded to a multiple). The other tests check the
properties of the op (special cases, causality, a key prefix, the attention mass, the slots' logit
bias, errors) and of the kernels (the key blocks their loops visit, lowering for TPU and GPU).
After the class: `attend_one` (= the last row of the parallel attention) and `rope`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax import ops
from bmojo_jax.ops import attention
from pallas_kernels import config as pallas_config
from pallas_kernels import memory_attention as pallas_attention
from tests import helpers

B, H, E = 2, 2, 8
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
# The Pallas kernel with tiles smaller than the CPU default: several query and key blocks at t = 37.
SMALL_TILES = pallas_config.AttentionBlocks(block_q=8, block_k=16, slot_multiple=4)
COMPARED = tuple(i for i in attention.IMPLEMENTATIONS if i != "reference") + (
    "pallas_small_tiles",)

CASES = {  # name: (t, window, fading, memory (per_chunk, slots) or None)
    "full_t13": (13, None, False, None),
    "full_t37": (37, None, False, None),
    "window6_t13": (13, 6, False, None),
    "window6_t37": (37, 6, False, None),
    "window_longer_than_t13": (13, 50, False, None),
    "window_longer_than_t37": (37, 50, False, None),
    "fading6_t13": (13, 6, True, None),
    "fading6_t37": (37, 6, True, None),
    "bmojo6_t13": (13, 6, True, (2, 4)),
    "bmojo6_t37": (37, 6, True, (2, 4)),
    "bmojo4_t13": (13, 4, True, (2, 4)),
    "bmojo4_t37": (37, 4, True, (2, 4)),
    "bmojo4_slots3_t37": (37, 4, True, (1, 3)),
    "bmojo20_window_wider_than_tiles_t40": (40, 20, True, (2, 6)),
}
# The cases each Pallas implementation runs (interpret mode is slow); the slow one checks how the
# op turns a window longer than t into full attention.
KERNEL_CASES = {
    "pallas": ("full_t13", "window6_t37", "window_longer_than_t37", "fading6_t37", "bmojo6_t37",
               "bmojo20_window_wider_than_tiles_t40"),
    "pallas_small_tiles": ("full_t37", "bmojo4_slots3_t37"),
}
SLOW = {("pallas", "window_longer_than_t37")}


def _compared_cases():
    return [pytest.param(implementation, case, id=f"{implementation}-{case}",
                         marks=[pytest.mark.slow] if (implementation, case) in SLOW else [])
            for implementation in COMPARED
            for case in (CASES if implementation == "xla" else KERNEL_CASES[implementation])]


def _inputs(t, dtype=jnp.float32):
    """q, k, v, k_fading, v_fading [B, t, H, E]."""
    return [jax.random.normal(k, (B, t, H, E)).astype(dtype) for k in helpers.keys(5, seed=2)]


def _memory(t, window, per_chunk=2, slots=4, seed=3):
    """Eidetic slots [B, c, slots] of random scores."""
    scores = jax.random.normal(jax.random.PRNGKey(seed), (B, t))
    return ops.select_eidetic(scores, window=window, per_chunk=per_chunk, slots=slots, lag=2,
                              implementation="reference")


def _implementation(implementation, window, memory_positions):
    """(q, k, v, k_fading, v_fading) -> [b, t, h, e] of one implementation."""
    if implementation == "pallas_small_tiles":  # the kernel itself, window resolved
        def kernel(q, k, v, kf, vf):
            return pallas_attention.memory_attention(q, k, v, kf, vf, memory_positions,
                                                     window or q.shape[1], blocks=SMALL_TILES)
        return kernel

    def op(q, k, v, kf, vf):
        return ops.memory_attention(q, k, v, window=window, k_fading=kf, v_fading=vf,
                                    memory_positions=memory_positions,
                                    implementation=implementation)
    return op


def _closeness(dtype, keys):
    """`check(actual, expected, grad)` for `helpers.assert_vjp_matches`, for a softmax over at most
    `keys` keys.

    float32: within FWD_TOL / GRAD_TOL (relative and absolute) and within a few float32 epsilons
    growing as sqrt(keys), relative to the largest value (outputs 2e-7 sqrt(keys), gradients
    1e-5 sqrt(keys)). bfloat16 inputs (the reference computes in float32 too): 2e-3 sqrt(keys) /
    3e-3 sqrt(keys) relative to the largest value.
    """
    def check(actual, expected, grad):
        if dtype == jnp.float32:
            helpers.assert_allclose(actual, expected, GRAD_TOL if grad else FWD_TOL)
            helpers.assert_close_to_scale(actual, expected,
                                          (1e-5 if grad else 2e-7) * math.sqrt(keys))
        else:
            helpers.assert_close_to_scale(actual, expected,
                                          (3e-3 if grad else 2e-3) * math.sqrt(keys))
    return check


def _check_matches_reference(implementation, t, window, fading, memory, dtype):
    q, k, v, kf, vf = _inputs(t, dtype)
    positions = _memory(t, window, *memory) if memory else None
    args = (q, k, v, kf if fading else None, vf if fading else None)
    keys = min(t, 2 * (window or t)) + (memory[1] if memory else 0)  # softmax length (at most)
    (out, _), _ = helpers.assert_vjp_matches(
        _implementation(implementation, window, positions),
        _implementation("reference", window, positions), args, _closeness(dtype, keys))
    assert out.dtype == jnp.float32


class TestMemoryAttention:

    @pytest.mark.parametrize("implementation,case", _compared_cases())
    def test_matches_reference(self, implementation, case):
        """Outputs and the gradients of q, k, v and the fading keys/values."""
        _check_matches_reference(implementation, *CASES[case], jnp.float32)

    @pytest.mark.parametrize("implementation", ["xla", pytest.param("pallas",
                                                                    marks=pytest.mark.slow)])
    def test_bfloat16(self, implementation):
        """bfloat16 inputs: a float32 output close to the float32 reference on the same inputs."""
        _check_matches_reference(implementation, *CASES["bmojo6_t37"], jnp.bfloat16)

    @pytest.mark.parametrize("implementation", ["reference", "xla"])
    def test_special_cases(self, implementation):
        t, w = 37, 6
        q, k, v, kf, vf = _inputs(t)

        def attn(**kw):
            return ops.memory_attention(q, k, v, implementation=implementation, **kw)

        # Window >= t is full causal attention.
        helpers.assert_allclose(attn(window=t), attn(window=None), FWD_TOL)
        # Empty eidetic memory is B'MOJO-F; B'MOJO-F without fading keys is sliding-window
        # attention.
        empty = jnp.full((B, -(-t // w), 4), -1, jnp.int32)
        bmojo_f = attn(window=w, k_fading=kf, v_fading=vf)
        helpers.assert_allclose(attn(window=w, k_fading=kf, v_fading=vf, memory_positions=empty),
                                bmojo_f, FWD_TOL)
        assert not np.allclose(bmojo_f, attn(window=w))

    @pytest.mark.parametrize("case", ["full_t37", "fading6_t37", "bmojo6_t37"])
    def test_segments_match_reference(self, case):
        """Packed documents (segment_ids, boundaries inside and between chunks): xla = reference,
        outputs and gradients."""
        t, window, fading, memory = CASES[case]
        q, k, v, kf, vf = _inputs(t)
        positions = _memory(t, window, *memory) if memory else None
        segments = jnp.asarray(np.searchsorted([5, 17, 18, 30], np.arange(t), side="right")
                               [None].repeat(B, 0))

        def op(implementation):
            return lambda q, k, v, kf, vf: ops.memory_attention(
                q, k, v, window=window, k_fading=kf, v_fading=vf, memory_positions=positions,
                segment_ids=segments, implementation=implementation)

        keys = min(t, 2 * (window or t)) + (memory[1] if memory else 0)
        helpers.assert_vjp_matches(op("xla"), op("reference"),
                                   (q, k, v, kf if fading else None, vf if fading else None),
                                   _closeness(jnp.float32, keys))

    @pytest.mark.parametrize("implementation", ["reference", "xla"])
    def test_segments_are_documents_one_by_one(self, implementation):
        """Two packed documents, the second starting at a chunk boundary: each one's outputs equal
        the op on that document alone (RoPE aside: these q, k carry none), window and fading
        keys included."""
        t, w, start = 37, 6, 18
        q, k, v, kf, vf = _inputs(t)
        segments = jnp.asarray((np.arange(t) >= start)[None].repeat(B, 0).astype(np.int32))

        def attn(a, segment_ids=None):
            q, k, v, kf, vf = a
            return ops.memory_attention(q, k, v, window=w, k_fading=kf, v_fading=vf,
                                        segment_ids=segment_ids, implementation=implementation)

        packed = attn((q, k, v, kf, vf), segments)
        helpers.assert_allclose(packed[:, :start], attn([x[:, :start] for x in (q, k, v, kf, vf)]),
                                FWD_TOL)
        helpers.assert_allclose(packed[:, start:], attn([x[:, start:] for x in (q, k, v, kf, vf)]),
                                FWD_TOL)
        assert not np.allclose(packed[:, start:], attn((q, k, v, kf, vf))[:, start:])

    def test_is_causal_in_keys(self):
        """Perturbing keys/values at position p changes no output before p (all key groups)."""
        t, w, p = 37, 6, 20
        q, k, v, kf, vf = _inputs(t)
        memory = _memory(t, w)

        def attn(k, v, kf, vf):
            return ops.memory_attention(q, k, v, window=w, k_fading=kf, v_fading=vf,
                                        memory_positions=memory, implementation="xla")

        bump = lambda x: x.at[:, p].add(1.0)  # noqa: E731
        before, after = attn(k, v, kf, vf), attn(bump(k), bump(v), bump(kf), bump(vf))
        np.testing.assert_array_equal(before[:, :p], after[:, :p])
        assert not np.allclose(before[:, p], after[:, p])

    @pytest.mark.parametrize("implementation", ["reference", "xla"])
    @pytest.mark.parametrize("window,fading,memory", [(None, False, False), (4, False, False),
                                                      (4, True, True)],
                             ids=["full", "window", "bmojo"])
    def test_key_prefix_is_a_slice_of_the_whole(self, implementation, window, fading, memory):
        """Queries of tokens [s, s + L) with the P keys before them as a prefix (how sequence
        parallelism calls the op) = rows [s, s + L) of the attention over the whole sequence;
        eidetic slots then index into the keys [prefix; own]."""
        t, w, start, length = 24, 4, 12, 8
        q, k, v, kf, vf = _inputs(t)
        memory = _memory(t, w) if memory else None
        fading = dict(k_fading=kf, v_fading=vf) if fading else {}
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
        helpers.assert_allclose(part, whole[:, start:start + length], FWD_TOL)

    def test_prefix_keys_before_position_zero_are_invisible(self):
        """A prefix of keys at negative positions (shard 0 of a sequence-parallel run) is
        masked."""
        q, k, v, kf, vf = _inputs(8)
        junk = [jnp.full_like(a, 100.0)[:, :8] for a in (k, v, kf, vf)]
        plain = ops.memory_attention(q, k, v, window=4, k_fading=kf, v_fading=vf)
        padded = ops.memory_attention(
            q, *(jnp.concatenate([j, a], axis=1) for j, a in zip(junk[:2], (k, v))), window=4,
            k_fading=jnp.concatenate([junk[2], kf], axis=1),
            v_fading=jnp.concatenate([junk[3], vf], axis=1), q_start=0)
        helpers.assert_allclose(padded, plain, FWD_TOL)

    @pytest.mark.parametrize("case", ["full_t13", "window6_t13", "fading6_t13", "bmojo6_t13"])
    def test_attention_mass_matches_reference(self, case):
        """`return_mass`: the weight of each query on the window, fading and eidetic keys (xla =
        reference; rows sum to 1; groups a case lacks get 0)."""
        t, window, fading, memory = CASES[case]
        q, k, v, kf, vf = _inputs(t)
        kw = dict(window=window, memory_positions=_memory(t, window) if memory else None)
        if fading:
            kw.update(k_fading=kf, v_fading=vf)
        out, mass = ops.memory_attention(q, k, v, return_mass=True, implementation="xla", **kw)
        ref_out, ref_mass = ops.memory_attention(q, k, v, return_mass=True,
                                                 implementation="reference", **kw)
        helpers.assert_allclose(out, ref_out, FWD_TOL)
        helpers.assert_allclose(mass, ref_mass, FWD_TOL)
        assert mass.shape == (B, t, 3)
        np.testing.assert_allclose(mass.sum(-1), 1.0, rtol=1e-5)
        assert (not fading or float(mass[..., 1].max()) > 0) and (
            memory or float(np.abs(mass[..., 2]).max()) == 0)

    def test_full_attention_by_query_blocks(self, monkeypatch):
        """Full attention over more than `xla.FULL_BLOCK` queries runs block by block (checked by
        counting): = reference, outputs and gradients, with packed documents and a key prefix,
        and the attention mass."""
        from bmojo_jax.ops.attention import xla
        monkeypatch.setattr(xla, "FULL_BLOCK", 8)
        calls = []
        blocks = xla._full_by_blocks
        monkeypatch.setattr(xla, "_full_by_blocks", lambda *a: calls.append(1) or blocks(*a))
        t, prefix = 37, 8
        q, k, v, _, _ = _inputs(t)
        segments = jnp.asarray(np.searchsorted([5, 17, 18, 30], np.arange(t), side="right")
                               [None].repeat(B, 0))

        def op(implementation, return_mass=False):
            return lambda q, k, v: ops.memory_attention(
                q[:, prefix:], k, v, segment_ids=segments, q_start=prefix,
                return_mass=return_mass, implementation=implementation)

        helpers.assert_vjp_matches(op("xla"), op("reference"), (q, k, v),
                                   _closeness(jnp.float32, t))
        for got, expected in zip(op("xla", True)(q, k, v), op("reference", True)(q, k, v)):
            helpers.assert_allclose(got, expected, FWD_TOL)
        assert calls

    def test_memory_bias_matches_reference(self):
        """The eidetic slots' logit bias (the "learned" selection): xla = reference, outputs and
        the gradients of q, k, v and the bias; the bias changes the output."""
        t, w = 13, 4
        q, k, v, kf, vf = _inputs(t)
        memory = _memory(t, w)
        bias = jax.nn.log_sigmoid(jax.random.normal(jax.random.PRNGKey(4), (B, t)))

        def run(implementation):
            def fn(q, k, v, bias):
                return ops.memory_attention(q, k, v, window=w, k_fading=kf, v_fading=vf,
                                            memory_positions=memory, memory_bias=bias,
                                            implementation=implementation)
            return fn

        (out, _), _ = helpers.assert_vjp_matches(run("xla"), run("reference"), (q, k, v, bias),
                                                 _closeness(jnp.float32, 2 * w + 4))
        assert not np.allclose(out, run("xla")(q, k, v, jnp.zeros_like(bias)))

    def test_errors(self):
        q, k, v, kf, vf = _inputs(9)
        with pytest.raises(ValueError, match="window=0"):
            ops.memory_attention(q, k, v, window=0)
        with pytest.raises(ValueError, match="both k_fading and v_fading"):
            ops.memory_attention(q, k, v, window=4, k_fading=kf)
        with pytest.raises(ValueError, match="finite window"):
            ops.memory_attention(q, k, v, k_fading=kf, v_fading=vf)
        with pytest.raises(ValueError, match="memory_positions has shape"):
            ops.memory_attention(q, k, v, window=4,
                                 memory_positions=jnp.zeros((B, 2, 4), jnp.int32))
        with pytest.raises(ValueError, match="implementation='nope'"):
            ops.memory_attention(q, k, v, implementation="nope")

    def test_pallas_errors(self):
        """What the kernels do not take fails loudly, pointing to `xla`."""
        q, k, v, _, _ = _inputs(8)
        pallas = functools.partial(ops.memory_attention, implementation="pallas")
        with pytest.raises(ValueError, match="does not return the attention mass"):
            pallas(q, k, v, return_mass=True)
        with pytest.raises(ValueError, match="takes no memory_bias"):
            pallas(q, k, v, window=4, memory_positions=_memory(8, 4), memory_bias=q[..., 0, 0])
        with pytest.raises(ValueError, match="takes no key prefix .* 4 keys before"):
            pallas(q[:, 4:], k, v, window=4, q_start=4)

    def test_kernel_visits_only_visible_key_blocks(self):
        """The Pallas forward's loops cover key blocks of chunks c-1, c (window) and c-2, c-1
        (fading) only, and the backward's loops the transposed ranges: counted on a long
        sequence."""
        w, t, blocks = 32, 1024, pallas_config.AttentionBlocks(block_q=16, block_k=16)
        st = pallas_attention._Static(window=w, fading=True, memory=False, n_chunks=t // w,
                                      padded_length=t, scale=1.0, blocks=blocks)
        for _, lo, hi in pallas_attention._groups(st):
            for q_block in range(st.n_q):
                first, end = (int(i) for i in pallas_attention._key_blocks(q_block * 16, st, lo,
                                                                            hi))
                assert end - first <= (w + 16) // 16  # 3 blocks of 16 for a window of 32
                q_chunk = q_block * 16 // w
                lowest_chunk = q_chunk - (2 if lo else 1)
                assert first * 16 >= max(lowest_chunk, 0) * w and (end - 1) * 16 // w <= q_chunk
            for k_block in range(st.n_k):
                first, end = (int(i) for i in pallas_attention._query_blocks(k_block * 16, st, lo,
                                                                              hi))
                assert end - first <= (w + 16) // 16  # empty (end <= first) past the last query

    @pytest.mark.parametrize("backend,platform", [("tpu", "tpu"), ("gpu", "cuda")])
    def test_pallas_lowers_for_accelerators(self, monkeypatch, backend, platform):
        """Forward and backward of the attention kernels lower (Pallas -> Mosaic TPU / Triton IR,
        with that backend's default tiles and compiler params) without the device: catches
        primitives the backend cannot lower. Compiling for the device still needs one."""
        monkeypatch.setattr(pallas_config, "backend", lambda: backend)
        b, t, h, e = 1, 256, 2, 128
        q = jnp.ones((b, t, h, e), jnp.bfloat16)
        memory = jnp.zeros((b, t // 128, 8), jnp.int32)
        cases = [
            (lambda q, k, v: pallas_attention.memory_attention(q, k, v, None, None, None, t),
             (q, q, q)),
            (lambda *a: pallas_attention.memory_attention(*a, memory, 128), (q,) * 5),
        ]
        for fn, args in cases:
            helpers.lower_with_gradients(fn, args, platform)


def test_attend_one_is_the_last_row_of_memory_attention():
    """Decoding: one query over the cached keys (window, fading and slot keys side by side, with a
    mask) = the last row of the parallel attention; the slots' bias too."""
    t, w = 13, 4
    q, k, v, kf, vf = _inputs(t)
    memory = _memory(t, w)
    bias = jax.random.normal(jax.random.PRNGKey(4), (B, t))
    whole = ops.memory_attention(q, k, v, window=w, k_fading=kf, v_fading=vf,
                                 memory_positions=memory, memory_bias=bias,
                                 implementation="reference")
    i = t - 1
    slots = memory[:, i // w]  # [B, m]
    take = jax.vmap(lambda x, p: x[p])
    keys = jnp.concatenate([k, kf, take(k, jnp.maximum(slots, 0))], axis=1)
    values = jnp.concatenate([v, vf, take(v, jnp.maximum(slots, 0))], axis=1)
    j = np.arange(t)
    mask = jnp.concatenate([jnp.broadcast_to((i - j >= 0) & (i - j < w), (B, t)),
                            jnp.broadcast_to((i - j >= w) & (i - j < 2 * w), (B, t)),
                            slots >= 0], axis=1)
    key_bias = jnp.concatenate([jnp.zeros((B, 2 * t)), take(bias, jnp.maximum(slots, 0))], 1)
    helpers.assert_allclose(ops.attend_one(q[:, i], keys, values, mask, bias=key_bias),
                            whole[:, i], FWD_TOL)


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends on i - j only (static and traced positions alike)."""
    q, k = _inputs(1)[:2]

    def score(i, j):
        return jnp.sum(ops.rope(q, jnp.array([i])) * ops.rope(k, jnp.array([j])))

    np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)
    assert not np.isclose(score(5, 2), score(5, 3))
    traced = jax.jit(lambda p: ops.rope(q, p))(jnp.array([5]))
    helpers.assert_allclose(traced, ops.rope(q, np.array([5])), FWD_TOL)
