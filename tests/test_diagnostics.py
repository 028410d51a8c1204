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


@pytest.mark.parametrize("rule", ["fading", "threshold"])
def test_oracle_keeps_the_context_and_the_layer_reads_it(rule):
    """Also under the threshold rule: oracle scores are taken as they are (no gate)."""
    inputs, targets = _batch()
    model = _model(eidetic_per_chunk=W, eidetic_slots=2 * K, eidetic_eviction="score",
                   eidetic_selection=rule, eidetic_threshold=4.0)
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
    assert set(result) == {"own", "oracle", "no_slots"}
    for value in result.values():
        assert 0 <= value <= 1 and (value * 2 * 2 * K).is_integer()
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


def test_retrieval_needs_ask_for_the_asked_needle_at_the_last_position():
    inputs = np.zeros((2, 12), np.int32)
    spans = np.array([[[2, 4], [6, 9]], [[7, 10], [1, 2]]])  # needle 0 is the asked one
    queries, needed, context = diagnostics.retrieval_needs(inputs, spans)
    assert queries[:, -1].all() and queries.sum() == 2
    np.testing.assert_array_equal(needed[0, -1], [2, 3, -1])
    np.testing.assert_array_equal(needed[1, -1], [7, 8, 9])
    assert (needed[:, :-1] == -1).all()
    np.testing.assert_array_equal(np.flatnonzero(context[0]), [2, 3, 6, 7, 8])
    np.testing.assert_array_equal(np.flatnonzero(context[1]), [1, 7, 8, 9])
    with pytest.raises(ValueError, match="within"):
        diagnostics.retrieval_needs(inputs, np.array([[[2, 13]], [[1, 2]]]))


def test_retrieval_diagnostics_find_an_oracle_needle_in_the_slots_and_in_the_store():
    """The needle [4, 8) given the oracle's scores (score eviction keeps it) sits in the slots
    when the question ends (recall 1, and the slots hold nothing else); a store holding every
    token before the lag never retrieves a position the slots hold; by blocks of rows, the same
    numbers; with the model's own rule each needle token is in the slots or retrieved."""
    model = _model(eidetic_per_chunk=W, eidetic_slots=W, eidetic_eviction="score",
                   storage_slots=T, storage_topk=T)
    inputs = np.asarray(jax.random.randint(jax.random.key(0), (2, T), 0, 64))
    spans = np.array([[[4, 8]], [[4, 8]]])
    oracle = jnp.asarray(np.broadcast_to((np.arange(T) >= 4) & (np.arange(T) < 8), (2, T)),
                         jnp.float32)
    result = diagnostics.retrieval_diagnostics(model, inputs, spans, eidetic_scores=oracle)[0]
    assert result["selection_recall"] == 1.0 and result["slot_precision"] == 1.0
    assert result["storage_recall"] == 0.0  # the slots' positions are never retrieved again
    assert 0 < result["attention_mass"]["eidetic"] < 1
    by_rows = diagnostics.retrieval_diagnostics(model, inputs, spans, eidetic_scores=oracle,
                                                batch_size=1)[0]
    assert by_rows["selection_recall"] == 1.0
    np.testing.assert_allclose(by_rows["attention_mass"]["eidetic"],
                               result["attention_mass"]["eidetic"], rtol=1e-5)
    own = diagnostics.retrieval_diagnostics(model, inputs, spans)[0]
    # the store retrieves every stored token (topk >= all): each needle token is in one or the other
    assert own["selection_recall"] + own["storage_recall"] == 1.0


def test_retrieval_selection_scores_the_answer_with_each_selection():
    """Own selection: the model's argmax on the answered rows; no slots: the same weights with
    every score -inf, which equals handing in -inf scores; the oracle: its scores mark the
    needle's answer tokens (1 there, -inf elsewhere: nothing else is kept)."""
    model = _model(eidetic_per_chunk=W, eidetic_slots=2 * W, eidetic_eviction="score")
    tokenizer = _DigitTokenizer()
    n, t = 2, T
    inputs = np.array(jax.random.randint(jax.random.key(1), (n, t), 10, 63), np.int32)
    inputs[:, 4:9] = [1, 2, 3, 4, 5]  # the needle's answer digits
    batch = bj.data.RetrievalBatch(inputs, ("12345", "12345"), np.array([[[4, 9]]] * n),
                                   np.zeros((n, 1)), 0.0)
    result = diagnostics.retrieval_selection(model, tokenizer, batch, batch_size=1)
    rows, targets, in_needle = bj.data.answered_rows(tokenizer, batch)
    np.testing.assert_array_equal(np.flatnonzero(in_needle[0]), [4, 5, 6, 7, 8])
    labelled = targets >= 0
    own = np.asarray(model(rows).argmax(-1))
    assert result["own"] == pytest.approx(((own == targets) & labelled).sum() / labelled.sum())
    empty = np.asarray(model(rows, eidetic_scores=np.full(rows.shape, -np.inf,
                                                            np.float32)).argmax(-1))
    assert result["no_slots"] == pytest.approx(
        ((empty == targets) & labelled).sum() / labelled.sum())
    oracle = np.full(rows.shape, -np.inf, np.float32)
    oracle[:, 4:9] = 1
    kept = np.asarray(model(rows, eidetic_scores=oracle).argmax(-1))
    assert result["oracle"] == pytest.approx(((kept == targets) & labelled).sum() / labelled.sum())
    assert all(0 <= v <= 1 for v in result.values())


class _DigitTokenizer:
    """Token ids 0-9 are the digits, 63 is " " (enough for `answered_rows`)."""

    def encode(self, text):
        return [63 if c == " " else int(c) for c in text]

    def decode(self, ids):
        return "".join(" " if i == 63 else str(i) for i in ids)
