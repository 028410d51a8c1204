"""`ops.select_eidetic` and `ops.chunk_topk`: every implementation against the reference, and no
slot is visible before its selection.

One test class, parametrised over the implementations (`eidetic.IMPLEMENTATIONS`; `pallas` runs the
`xla` one) where they are compared, over both evictions and buffer sizes / lags (one chunk's
selections at lag 1, three chunks' at lag 2, four at lag 3). T = 53 tokens in chunks of W = 5: the
last chunk is partial. The streaming state (`eidetic.update` after `eidetic.state_after`) is checked
against the parallel selection through the model: tests/test_decoding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bmojo_jax import ops
from bmojo_jax.ops import eidetic

T, W, K = 53, 5, 2
COMPARED = [i for i in eidetic.IMPLEMENTATIONS if i != "reference"]


def _scores(seed=0, b=3):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, T))


class TestSelectEidetic:

    @pytest.mark.parametrize("eviction", ["fifo", "score"])
    @pytest.mark.parametrize("slots,lag", [(2, 1), (6, 2), (8, 3)])
    @pytest.mark.parametrize("implementation", COMPARED)
    def test_matches_reference(self, implementation, eviction, slots, lag):
        kw = dict(window=W, per_chunk=K, slots=slots, lag=lag, eviction=eviction)
        out = ops.select_eidetic(_scores(), implementation=implementation, **kw)
        ref = ops.select_eidetic(_scores(), implementation="reference", **kw)
        assert out.shape == (3, -(-T // W), slots) and out.dtype == np.int32
        np.testing.assert_array_equal(np.sort(out, -1), np.sort(ref, -1))

    @pytest.mark.parametrize("eviction", ["fifo", "score"])
    @pytest.mark.parametrize("implementation", COMPARED)
    def test_documents_match_reference(self, implementation, eviction):
        """Packed documents (starts inside and at chunk boundaries): = the reference."""
        segments = jnp.asarray(np.searchsorted([7, 20, 23, 40], np.arange(T), side="right")
                               [None].repeat(3, 0))
        kw = dict(window=W, per_chunk=K, slots=6, lag=2, eviction=eviction,
                  starts=eidetic.document_starts(segments, W))
        out = ops.select_eidetic(_scores(), implementation=implementation, **kw)
        ref = ops.select_eidetic(_scores(), implementation="reference", **kw)
        np.testing.assert_array_equal(np.sort(out, -1), np.sort(ref, -1))

    @pytest.mark.parametrize("eviction", ["fifo", "score"])
    def test_documents_are_selected_as_alone(self, eviction):
        """A document starting at a chunk boundary keeps the slots it would keep alone (shifted
        by its start), whatever the document before it selected."""
        start = 4 * W
        scores = _scores(seed=4)
        segments = jnp.asarray((np.arange(T) >= start)[None].repeat(3, 0).astype(np.int32))
        kw = dict(window=W, per_chunk=K, slots=4, lag=2, eviction=eviction)
        packed = ops.select_eidetic(scores, starts=eidetic.document_starts(segments, W), **kw)
        alone = ops.select_eidetic(scores[:, start:], **kw)
        np.testing.assert_array_equal(np.sort(packed[:, start // W:], -1),
                                      np.sort(jnp.where(alone >= 0, alone + start, -1), -1))
        first = ops.select_eidetic(scores[:, :start], **kw)
        np.testing.assert_array_equal(packed[:, :start // W], first)

    @pytest.mark.parametrize("eviction", ["fifo", "score"])
    def test_no_slot_visible_before_selection(self, eviction):
        lag, slots = 2, 6
        scores = _scores(seed=1)
        memory = np.asarray(ops.select_eidetic(scores, window=W, per_chunk=K, slots=slots,
                                               lag=lag, eviction=eviction))
        selected, _ = ops.chunk_topk(scores, W, K)
        selected = np.asarray(selected)
        for b in range(memory.shape[0]):
            for chunk in range(memory.shape[1]):
                row = memory[b, chunk][memory[b, chunk] >= 0]
                assert len(set(row)) == len(row)
                visible_chunks = max(0, chunk - lag + 1)
                assert len(row) == min(slots, K * visible_chunks)
                for p in row:
                    assert p // W <= chunk - lag, (b, chunk, p)  # selected >= `lag` chunks ago
                    assert p in selected[b, p // W]  # and really selected in its own chunk
                    assert p < T  # never padding

    @pytest.mark.parametrize("slots,lag", [(6, 2), (8, 3)])
    @pytest.mark.parametrize("length", [1, W * 2, W * 3 + 1, W * 4, T])
    def test_slots_filled_is_the_fullest_buffer(self, slots, lag, length):
        memory = np.asarray(ops.select_eidetic(_scores()[:, :length], window=W, per_chunk=K,
                                               slots=slots, lag=lag, implementation="reference"))
        assert eidetic.slots_filled(length, window=W, per_chunk=K, slots=slots, lag=lag) == (
            (memory >= 0).sum(-1).max())

    def test_score_eviction_keeps_the_most_surprising(self):
        scores = _scores(seed=2, b=1)
        memory = np.asarray(ops.select_eidetic(scores, window=W, per_chunk=K, slots=4, lag=1,
                                               eviction="score"))
        selected, values = ops.chunk_topk(scores, W, K)
        last = memory.shape[1] - 1
        candidates = np.asarray(selected)[0, :last].ravel()
        best = candidates[np.argsort(-np.asarray(values)[0, :last].ravel())[:4]]
        np.testing.assert_array_equal(np.sort(memory[0, last]), np.sort(best))

    @pytest.mark.parametrize("gate", [dict(threshold=1.5), dict(quantile=0.25),
                                      dict(quantile=0.75)])
    def test_gate_matches_brute_force(self, gate):
        """The gates of `Selection`: a token is a candidate when its score exceeds c times the
        mean of all scores before it, or the q-quantile of the W scores before it (every token
        while none precede it); the others are -inf."""
        scores = np.asarray(jnp.abs(_scores(seed=4)))
        got = np.asarray(eidetic.Selection(window=W, per_chunk=K, slots=4, **gate).gate(scores))
        for row, t in np.ndindex(scores.shape):
            before = scores[row, :t] if "threshold" in gate else scores[row, max(t - W, 0):t]
            if not len(before):
                passes = True
            elif "threshold" in gate:
                passes = scores[row, t] > gate["threshold"] * before.mean()
            else:
                passes = scores[row, t] > np.quantile(before, gate["quantile"])
            assert got[row, t] == (scores[row, t] if passes else -np.inf), (row, t)
        assert 0 < np.isinf(got).mean() < 1  # the gate rejects some tokens, not all

    def test_padding_is_never_selected(self):
        positions, values = ops.chunk_topk(_scores()[:, :7], window=5, k=3)
        assert np.all(np.asarray(positions)[:, 1, 2] == -1)  # the last chunk has 2 real tokens
        assert np.all(np.asarray(positions) < 7)

    @pytest.mark.parametrize("kw,match", [
        (dict(per_chunk=0), "per_chunk=0"),
        (dict(per_chunk=6), "per_chunk=6"),
        (dict(slots=3), "slots=3"),
        (dict(lag=0), "lag=0"),
        (dict(eviction="lru"), "eviction='lru'"),
        (dict(implementation="nope"), "implementation='nope'"),
    ])
    def test_bad_knobs(self, kw, match):
        args = dict(window=W, per_chunk=K, slots=4, lag=2, eviction="fifo")
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            ops.select_eidetic(_scores(), **args)

    def test_slots_filled_bad_length(self):
        with pytest.raises(ValueError, match="length=0"):
            eidetic.slots_filled(0, window=W, per_chunk=K, slots=4)


class TestSelectWholeState:
    """The "state" rule: xla = the chunk-by-chunk reference; a token the state already holds
    verbatim scores 0 and does not take a slot again."""

    @pytest.mark.parametrize("eviction,slots,lag", [("fifo", 6, 2), ("score", 2, 1)])
    def test_matches_reference(self, eviction, slots, lag):
        x = jax.random.normal(jax.random.PRNGKey(4), (3, T, 5))
        x = x.at[:, 20].set(x[:, 3])  # a repeat of a token held in a slot by then, perhaps
        kw = dict(window=W, per_chunk=K, slots=slots, lag=lag, eviction=eviction)
        rows, scores = ops.select_whole_state(_scores(), x, implementation="xla", **kw)
        ref_rows, ref_scores = ops.select_whole_state(_scores(), x, implementation="reference",
                                                      **kw)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.sort(rows, -1), np.sort(ref_rows, -1))
        assert rows.shape == (3, -(-T // W), slots)

    def test_a_held_token_is_predictable(self):
        """A token equal to one in its window, or in a slot of its chunk, scores 0 and is not
        selected; with x far apart the scores are the innovation's."""
        x = 100.0 * jax.random.normal(jax.random.PRNGKey(5), (1, T, 5))
        innovation = jnp.full((1, T), 1.0)
        rows, scores = ops.select_whole_state(innovation, x, window=W, per_chunk=1, slots=4,
                                              lag=1, eviction="score")
        np.testing.assert_allclose(scores, innovation)  # nothing near: the innovation
        repeat = x.at[0, W + 1].set(x[0, W])  # the token before it, in its window
        rows, scores = ops.select_whole_state(innovation, repeat, window=W, per_chunk=1,
                                              slots=4, lag=1, eviction="score")
        assert float(scores[0, W + 1]) == 0.0
        held = int(rows[0, 2][0])  # a slot of chunk 2 (selected in chunk 0 or 1)
        repeat = x.at[0, 2 * W + 3].set(x[0, held])
        _, scores = ops.select_whole_state(innovation, repeat, window=W, per_chunk=1, slots=4,
                                           lag=1, eviction="score")
        assert float(scores[0, 2 * W + 3]) == 0.0


class TestStorage:
    """`storage.retrieve` against a brute-force loop: per query chunk, the r stored tokens
    (entry "window": 2 chunks old or more, the last S of them; "evicted": held in the slots of
    a chunk <= c - 2 and not in those of chunk c - 1, the S latest; of the chunk's document,
    not its eidetic slots) with the largest key . (previous chunk's mean query); no token is
    retrievable before it is stored."""

    @pytest.mark.parametrize("packed,entry", [(False, "window"), (True, "window"),
                                              (False, "evicted"), (True, "evicted")])
    def test_matches_brute_force(self, packed, entry):
        from bmojo_jax.ops.eidetic import storage
        b, h, e, capacity, topk = 2, 2, 4, 12, 3
        keys = jax.random.split(jax.random.PRNGKey(5), 2)
        q, k = (jax.random.normal(key, (b, T, h, e)) for key in keys)
        exclude = ops.select_eidetic(_scores(b=b), window=W, per_chunk=K, slots=4)
        segments = np.searchsorted([23, 40], np.arange(T), side="right")[None].repeat(b, 0)
        starts = eidetic.document_starts(jnp.asarray(segments), W) if packed else None
        got = np.asarray(storage.retrieve(q, k, window=W, capacity=capacity, topk=topk,
                                          exclude=exclude, starts=starts, entry=entry))
        approximate = storage.retrieve(q, k, window=W, capacity=capacity, topk=topk,
                                       exclude=exclude, starts=starts, entry=entry, recall=0.5)
        if jax.default_backend() != "tpu":  # lax.approx_max_k is exact off TPU
            np.testing.assert_array_equal(approximate, got)
        q, k, exclude = np.asarray(q), np.asarray(k), np.asarray(exclude)
        used = 0
        for row in range(b):
            for chunk in range(-(-T // W)):
                end = (chunk - 1) * W  # the store holds positions < end
                if entry == "window":
                    stored = list(range(max(end - capacity, 0), end))
                else:
                    stored = [p for p in range(T) if p not in exclude[row, chunk - 1] and any(
                        p in exclude[row, j] for j in range(chunk - 1))][-capacity:]
                first = 0 if starts is None else int(starts[row, chunk])
                candidates = [p for p in stored if p >= first and p not in exclude[row, chunk]]
                used += len(candidates) > 0
                if chunk:
                    mean = q[row, (chunk - 1) * W:chunk * W].mean(0)
                    score = {p: float(np.sum(mean * k[row, p])) for p in candidates}
                    expected = sorted(candidates, key=lambda p: -score[p])[:topk]
                else:
                    expected = []
                assert sorted(got[row, chunk][got[row, chunk] >= 0]) == sorted(expected), \
                    (row, chunk)
                assert all(p < end for p in got[row, chunk] if p >= 0)  # stored before read
        # the store served several chunks (but packed "evicted": these slots, not restarted per
        # document, evict no token of the later documents in time)
        assert used > b or (packed and entry == "evicted")
