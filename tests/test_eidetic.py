"""Eidetic selection: xla vs reference, and no slot is visible before its selection."""

import jax
import numpy as np
import pytest

from bmojo_jax import ops

T, W, K = 53, 5, 2


def _scores(seed=0, b=3):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, T))


@pytest.mark.parametrize("eviction", ["fifo", "score"])
@pytest.mark.parametrize("slots,lag", [(2, 1), (6, 2), (8, 3)])
def test_xla_matches_reference(eviction, slots, lag):
    kw = dict(window=W, per_chunk=K, slots=slots, lag=lag, eviction=eviction)
    xla = ops.select_eidetic(_scores(), implementation="xla", **kw)
    ref = ops.select_eidetic(_scores(), implementation="reference", **kw)
    assert xla.shape == (3, -(-T // W), slots) and xla.dtype == np.int32
    np.testing.assert_array_equal(np.sort(xla, -1), np.sort(ref, -1))


@pytest.mark.parametrize("eviction", ["fifo", "score"])
def test_no_slot_visible_before_selection(eviction):
    lag, slots = 2, 6
    scores = _scores(seed=1)
    memory = np.asarray(ops.select_eidetic(scores, window=W, per_chunk=K, slots=slots, lag=lag,
                                           eviction=eviction))
    selected, _ = ops.chunk_topk(scores, W, K)
    selected = np.asarray(selected)
    for b in range(memory.shape[0]):
        for chunk in range(memory.shape[1]):
            row = memory[b, chunk][memory[b, chunk] >= 0]
            assert len(set(row)) == len(row)
            visible_chunks = max(0, chunk - lag + 1)
            assert len(row) == min(slots, K * visible_chunks)
            for p in row:
                assert p // W <= chunk - lag, (b, chunk, p)  # selected at least `lag` chunks ago
                assert p in selected[b, p // W]  # and really selected in its own chunk
                assert p < T  # never padding


def test_score_eviction_keeps_the_most_surprising():
    scores = _scores(seed=2, b=1)
    memory = np.asarray(ops.select_eidetic(scores, window=W, per_chunk=K, slots=4, lag=1,
                                           eviction="score"))
    selected, values = ops.chunk_topk(scores, W, K)
    last = memory.shape[1] - 1
    candidates = np.asarray(selected)[0, :last].ravel()
    best = candidates[np.argsort(-np.asarray(values)[0, :last].ravel())[:4]]
    np.testing.assert_array_equal(np.sort(memory[0, last]), np.sort(best))


def test_padding_is_never_selected():
    positions, values = ops.chunk_topk(_scores()[:, :7], window=5, k=3)
    assert np.all(np.asarray(positions)[:, 1, 2] == -1)  # the last chunk has only 2 real tokens
    assert np.all(np.asarray(positions) < 7)


@pytest.mark.parametrize("kw,match", [
    (dict(per_chunk=0), "per_chunk=0"),
    (dict(per_chunk=6), "per_chunk=6"),
    (dict(slots=3), "slots=3"),
    (dict(lag=0), "lag=0"),
    (dict(eviction="lru"), "eviction='lru'"),
])
def test_bad_knobs(kw, match):
    args = dict(window=W, per_chunk=K, slots=4, lag=2, eviction="fifo")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ops.select_eidetic(_scores(), **args)
