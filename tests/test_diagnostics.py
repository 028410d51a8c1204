"""Eidetic diagnostics: an oracle that keeps the key/value context (with score eviction: fifo
would push it out after slots / per_chunk chunks) has recall and precision 1;
the per-chunk cap shows as a ceiling; the random rule keeps fewer context tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax import diagnostics
from bmojo_jax.data import mqar

K, T, W = 4, 48, 4  # context [0, 8) = 2 chunks; queries from 24 on (beyond window + fading)


def _batch():
    return mqar(64, input_seq_len=T, num_kv_pairs=K, num_examples=2, query_start=24, seed=1)


def _model(**changes):
    config = bj.ModelConfig.preset("bmojo", vocab_size=64, d_model=16, n_heads=2, window=W,
                                   d_state=4, ssm_head_dim=8, n_layers=1, **changes)
    return bj.LanguageModel(config, rngs=nnx.Rngs(0))


def test_mqar_needs_points_at_the_pair():
    inputs, targets = _batch()
    queries, needed, context = diagnostics.mqar_needs(inputs, targets, 2 * K)
    rows, cols = np.nonzero(queries)
    assert len(rows) == 2 * K
    keys_at = needed[rows, cols, 0]
    np.testing.assert_array_equal(inputs[rows, keys_at], inputs[rows, cols])  # the query's key
    np.testing.assert_array_equal(inputs[rows, keys_at + 1], targets[rows, cols])  # its value
    assert context[:, :2 * K].all() and not context[:, 2 * K:].any()
    with pytest.raises(ValueError, match="context_length=1"):
        diagnostics.mqar_needs(inputs, targets, 1)


@pytest.mark.parametrize("rule", ["fading", "threshold", "quantile"])
def test_oracle_keeps_the_context_and_the_layer_reads_it(rule):
    """Also under the threshold and quantile rules: oracle scores are taken as they are (no
    gate; these gates would reject most of the context)."""
    inputs, targets = _batch()
    model = _model(eidetic_per_chunk=W, eidetic_slots=2 * K, eidetic_eviction="score",
                   eidetic_selection=rule, eidetic_threshold=4.0, eidetic_quantile=0.9)
    oracle = jnp.asarray(np.broadcast_to(np.arange(T) < 2 * K, (2, T)), jnp.float32)
    result = diagnostics.eidetic_diagnostics(model, inputs, targets, 2 * K,
                                             eidetic_scores=oracle)[0]
    assert result["selection_recall"] == 1.0 and result["recall_ceiling"] == 1.0
    assert result["slot_precision"] == 1.0
    mass = result["attention_mass"]
    assert mass["eidetic"] > 0 and abs(sum(mass.values()) - 1) < 1e-5


def test_per_chunk_cap_is_the_ceiling_and_random_is_worse():
    inputs, targets = _batch()
    capped = _model(eidetic_per_chunk=1, eidetic_slots=4, eidetic_eviction="score")  # 1 a chunk
    oracle = jnp.asarray(np.broadcast_to(np.arange(T) < 2 * K, (2, T)), jnp.float32)
    result = diagnostics.eidetic_diagnostics(capped, inputs, targets, 2 * K,
                                             eidetic_scores=oracle)[0]
    assert result["recall_ceiling"] == 0.25
    assert result["selection_recall"] <= 0.25
    random = diagnostics.eidetic_diagnostics(
        _model(eidetic_per_chunk=W, eidetic_slots=2 * K, eidetic_selection="random"), inputs,
        targets, 2 * K)[0]
    assert random["slot_precision"] < 1.0



def test_accuracy_by_selection_scores_both_selections():
    """An untrained model: the accuracies (own rule, oracle, no slots) are fractions of the 2 K
    labelled queries per row, and the oracle's scores change the forward (the random rule keeps
    other tokens than the context)."""
    inputs, targets = _batch()
    model = _model(eidetic_per_chunk=W, eidetic_slots=2 * K, eidetic_eviction="score",
                   eidetic_selection="random")
    result = diagnostics.accuracy_by_selection(model, [(inputs, targets)], 2 * K)
    assert set(result) == {f"{name}{kind}" for name in ("own", "oracle", "no_slots")
                           for kind in ("", "_exact")}
    for name in ("own", "oracle", "no_slots"):  # of 2 K queries in each of 2 rows
        assert 0 <= result[name] <= 1 and (result[name] * 2 * 2 * K).is_integer()
        assert (result[f"{name}_exact"] * 2).is_integer()
        assert result[f"{name}_exact"] <= result[name]
    trace = model.eidetic_trace(np.asarray(inputs))[0]["memory_positions"]
    oracle = jnp.asarray(np.broadcast_to(np.arange(T) < 2 * K, (2, T)), jnp.float32)
    assert not np.array_equal(trace, model.eidetic_trace(np.asarray(inputs),
                                                          eidetic_scores=oracle)[0][
        "memory_positions"])


class _FirstValue(nnx.Module):
    """Answers every position with the token at position 1 (the first pair's value)."""

    def __call__(self, tokens, eidetic_scores=None):
        return jax.nn.one_hot(jnp.broadcast_to(tokens[:, 1:2], tokens.shape), 64)


def test_answer_breakdown_sorts_the_answers():
    """A model that always answers the first value: correct exactly on the queries of the first
    key, another context value on the others, never a key or another token."""
    inputs, targets = _batch()
    asked_first = np.asarray(inputs == inputs[:, :1])[np.asarray(targets) >= 0].mean()
    result = diagnostics.answer_breakdown(_FirstValue(), [(inputs, targets)], 2 * K)
    answers = {k: result.pop(k) for k in ("answered", "accuracy_by_pair")}
    assert result == pytest.approx(dict(correct=asked_first, other_value=1 - asked_first, key=0,
                                        elsewhere=0))
    assert answers == dict(answered=[1, 0, 0, 0], accuracy_by_pair=[1, 0, 0, 0])
    assert 0 < asked_first < 1  # the batch asks other keys too: the test has teeth
    untrained = diagnostics.answer_breakdown(_model(), [(inputs, targets)], 2 * K, oracle=True)
    assert sum(untrained[k] for k in ("correct", "other_value", "key", "elsewhere")) == (
        pytest.approx(1.0))


def test_attention_mass_by_span_averages_the_positions_of_each_span():
    """Before the first lagged slots (2 chunks) no query reads an eidetic key; each span's mass
    is the mean of the trace over its positions and sums to 1."""
    inputs, _ = _batch()
    trace = _model().eidetic_trace(np.asarray(inputs))
    result = diagnostics.attention_mass_by_span(trace, (0, 2 * W, T))[0]
    mass = np.asarray(trace[0]["attention_mass"])  # [b, t, 3]
    for name, (a, b) in (("0-8", (0, 2 * W)), ("8-48", (2 * W, T))):
        np.testing.assert_allclose(list(result[name].values()), mass[:, a:b].mean((0, 1)),
                                   rtol=1e-6)
        assert abs(sum(result[name].values()) - 1) < 1e-5
    assert result["0-8"]["eidetic"] == 0 and result["8-48"]["eidetic"] > 0
    for edges in ((0, 8, 8), (0, T + 1)):
        with pytest.raises(ValueError, match="must increase within"):
            diagnostics.attention_mass_by_span(trace, edges)


def test_induction_test_separates_a_copier_from_a_model_that_cannot_copy():
    """A model that copies the token after the earlier occurrence scores the second copy at ~0
    nats and every argmax right; a model with uniform logits scores both copies at ln V."""
    vocab, span = 50, 16

    def copier(rows):  # at p >= span, all its mass on rows[p + 1 - span]: the next token
        shifted = jnp.roll(rows, span - 1, axis=1)  # shifted[:, p] = rows[:, p + 1 - span]
        logits = 30.0 * jax.nn.one_hot(shifted, vocab)
        return jnp.where((jnp.arange(rows.shape[1]) >= span)[None, :, None], logits, 0.0)

    copied = diagnostics.induction_test(copier, 1, vocab, span=span)
    assert copied["first_copy_nll"] == pytest.approx(np.log(vocab))
    assert copied["second_copy_nll"] < 1e-6 and copied["copy_accuracy"] == 1.0
    uniform = diagnostics.induction_test(lambda rows: jnp.zeros((*rows.shape, vocab)), 1, vocab,
                                         span=span)
    assert uniform["second_copy_nll"] == pytest.approx(np.log(vocab))
    assert uniform["copy_accuracy"] == 0.0  # the argmax of equal logits is token 0, never drawn
    with pytest.raises(ValueError, match=r"span=1 must be >= 2"):
        diagnostics.induction_test(copier, 1, vocab, span=1)


def test_retrieval_needs_ask_for_the_needle_where_the_answer_is_written():
    targets = np.full((2, 14), -100)
    targets[:, 12:14] = 7  # the answer's digits, predicted at positions 12 and 13
    in_needle = np.zeros((2, 12), bool)
    in_needle[0, [2, 3]] = in_needle[1, [8, 9, 10]] = True
    spans = np.array([[[2, 4], [6, 9]], [[7, 11], [1, 2]]])  # needle 0 is the asked one
    queries, needed, context = diagnostics.retrieval_needs(targets, in_needle, spans)
    np.testing.assert_array_equal(np.argwhere(queries), [[0, 12], [0, 13], [1, 12], [1, 13]])
    np.testing.assert_array_equal(needed[0, 12], [2, 3, -1])
    np.testing.assert_array_equal(needed[1, 13], [8, 9, 10])
    assert (needed[:, :12] == -1).all()
    np.testing.assert_array_equal(np.flatnonzero(context[0]), [2, 3, 6, 7, 8])
    np.testing.assert_array_equal(np.flatnonzero(context[1]), [1, 7, 8, 9, 10])
    with pytest.raises(ValueError, match="within"):
        diagnostics.retrieval_needs(targets, in_needle, np.array([[[2, 13]], [[1, 2]]]))
    with pytest.raises(ValueError, match="every row needs"):
        diagnostics.retrieval_needs(np.full((2, 14), -100), in_needle, spans)


class _DigitTokenizer:
    """Token ids 0-9 are the digits, 63 is " " (enough for `data.answered_rows`)."""

    def encode(self, text):
        return [63 if c == " " else int(c) for c in text]

    def decode(self, ids):
        return "".join(" " if i == 63 else str(i) for i in ids)


def _needle_batch(n=2):
    """Random prompts of T tokens (ids 10-62) with the needle [4, 10) = " 12345" (answer
    "12345", its digits at [5, 10))."""
    inputs = np.array(jax.random.randint(jax.random.key(1), (n, T), 10, 63), np.int32)
    inputs[:, 4:10] = [63, 1, 2, 3, 4, 5]
    return bj.data.RetrievalBatch(inputs, ("12345",) * n, np.array([[[4, 10]]] * n),
                                  np.zeros((n, 1)), 0.0)


def test_retrieval_diagnostics_find_an_oracle_needle_in_the_slots_and_in_the_store():
    """The needle's digits [5, 10) given the oracle's scores (score eviction keeps them) sit in
    the slots while the answer is written (recall 1, and the slots hold nothing else); a store
    holding every token before the lag never retrieves a position the slots hold; by blocks of
    rows, the same numbers; with the model's own rule each needle token is in the slots or
    retrieved. A layer with a store and no slots is traced too."""
    model = _model(eidetic_per_chunk=W, eidetic_slots=2 * W, eidetic_eviction="score",
                   storage_slots=2 * T, storage_topk=2 * T)
    batch, tokenizer = _needle_batch(), _DigitTokenizer()
    rows, _, in_needle = bj.data.answered_rows(tokenizer, batch)
    np.testing.assert_array_equal(np.flatnonzero(in_needle[0]), [5, 6, 7, 8, 9])
    oracle = np.full(rows.shape, -np.inf, np.float32)
    oracle[:, 5:10] = 1
    result = diagnostics.retrieval_diagnostics(model, tokenizer, batch,
                                               eidetic_scores=oracle)[0]
    assert result["selection_recall"] == 1.0 and result["slot_precision"] == 1.0
    assert result["storage_recall"] == 0.0 and result["reachable"] == 1.0
    assert 0 < result["attention_mass"]["eidetic"] < 1
    by_rows = diagnostics.retrieval_diagnostics(model, tokenizer, batch, eidetic_scores=oracle,
                                                batch_size=1)[0]
    assert by_rows["selection_recall"] == 1.0
    np.testing.assert_allclose(by_rows["attention_mass"]["eidetic"],
                               result["attention_mass"]["eidetic"], rtol=1e-5)
    own = diagnostics.retrieval_diagnostics(model, tokenizer, batch)[0]
    # the store retrieves every stored token (topk >= all): each needle token is in one or the other
    assert own["selection_recall"] + own["storage_recall"] == 1.0
    store_only = diagnostics.retrieval_diagnostics(
        _model(eidetic_per_chunk=0, eidetic_slots=0, storage_slots=2 * T, storage_topk=2 * T),
        tokenizer, batch)[0]
    assert store_only["storage_recall"] == 1.0 and "selection_recall" not in store_only


def test_retrieval_selection_hands_each_run_its_model_and_scores(monkeypatch):
    """Own: the model, its own scores; oracle: the oracle model, 1 exactly at the needle's
    answer tokens and -inf elsewhere; no slots: the model, -inf everywhere. A stub that answers
    right where the scores are the oracle's scores 1 and 1 exact; wrong elsewhere, 0."""
    model, kept = _model(eidetic_per_chunk=W, eidetic_slots=W), _model(
        eidetic_per_chunk=W, eidetic_slots=W, eidetic_eviction="score")
    batch, tokenizer = _needle_batch(), _DigitTokenizer()
    rows, targets, in_needle = bj.data.answered_rows(tokenizer, batch)
    calls = []

    def predictions(m, inputs, scores):
        calls.append((m, None if scores is None else np.asarray(scores)))
        oracle = scores is not None and np.isfinite(np.asarray(scores)).any()
        return np.where(targets >= 0, targets, 0) if oracle else np.zeros_like(targets)

    monkeypatch.setattr(diagnostics, "_predictions", predictions)
    result = diagnostics.retrieval_selection(model, tokenizer, batch, oracle_model=kept)
    (own, own_scores), (oracle_model, oracle), (empty, none) = calls
    assert own is model and own_scores is None and oracle_model is kept and empty is model
    np.testing.assert_array_equal(oracle[:, :T] == 1, in_needle)
    assert (oracle[oracle != 1] == -np.inf).all() and (none == -np.inf).all()
    assert result["oracle"] == result["oracle_exact"] == 1.0
    assert result["own"] == result["no_slots"] == result["own_exact"] == 0.0
