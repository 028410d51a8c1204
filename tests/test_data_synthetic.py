"""Synthetic task generators: the MQAR reference example, label placement, the far-query
variant, probes, determinism."""

import numpy as np
import pytest

from bmojo_jax.data import (IGNORE_INDEX, SYNTHETIC_TASKS, accuracy, fuzzy_in_context_recall,
                            in_context_recall, mqar, noisy_in_context_recall, selective_copying)

MQAR_SMALL = dict(vocab_size=64, input_seq_len=32, num_kv_pairs=4, num_examples=50)


def test_mqar_reproduces_reference_worked_example():
    inputs, labels = mqar(vocab_size=32, num_examples=2, input_seq_len=16, seed=0, num_kv_pairs=2,
                          random_non_queries=False)
    assert inputs[0].tolist() == [2, 20, 7, 28, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 7, 0]
    assert labels[0].tolist() == [-100] * 8 + [20] + [-100] * 5 + [28, -100]


def test_mqar_reproduces_reference_label_positions():
    _, labels = mqar(vocab_size=8192, input_seq_len=256, num_kv_pairs=16, num_examples=4,
                     power_a=0.01, random_non_queries=True, seed=0)
    assert np.flatnonzero(labels[0] != IGNORE_INDEX).tolist() == [
        32, 34, 36, 38, 40, 46, 50, 54, 62, 66, 68, 72, 84, 100, 108, 176]


@pytest.mark.parametrize("num_passes", [1, 2])
def test_mqar_structure(num_passes):
    v, t, k = MQAR_SMALL["vocab_size"], MQAR_SMALL["input_seq_len"], MQAR_SMALL["num_kv_pairs"]
    inputs, labels = mqar(**MQAR_SMALL, num_passes=num_passes, seed=3)
    assert inputs.shape == labels.shape == (50, t)
    assert inputs.dtype == labels.dtype == np.int32
    c = 2 * k * num_passes
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert len(set(keys.tolist())) == k and len(set(values.tolist())) == k
        assert np.all((keys >= 1) & (keys < v // 2)) and np.all((values >= v // 2) & (values < v))
        assert np.array_equal(x[:c], np.tile(x[:2 * k], num_passes))
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == k and np.all(pos >= c) and np.all((pos - c) % 2 == 0)
        value_of = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())  # each key queried once
        for p in pos:
            assert y[p] == value_of[x[p]]  # label at the query key = its paired value
        query = np.delete(x[c:], pos - c)
        assert np.all(query == 0)


def test_mqar_random_non_queries_only_touches_fillers():
    clean, labels = mqar(**MQAR_SMALL, seed=1)
    noisy, noisy_labels = mqar(**MQAR_SMALL, seed=1, random_non_queries=True)
    assert np.array_equal(labels, noisy_labels)
    assert np.array_equal(clean[clean != 0], noisy[clean != 0])
    assert np.any(noisy[clean == 0] != 0)


def test_mqar_deterministic_per_seed():
    a, b = mqar(**MQAR_SMALL, seed=7), mqar(**MQAR_SMALL, seed=7)
    c = mqar(**MQAR_SMALL, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("num_passes", [1, 2])
def test_mqar_query_start_puts_every_query_far_from_the_context(num_passes):
    """Every query at >= query_start, every answer's key in the context (< C = 2*K*P), labels the
    paired values, filler elsewhere; the gaps still follow the power law inside [q, L)."""
    v, t, k, q = 64, 48, 4, 29  # an odd q: queries at q + 2*g
    inputs, labels = mqar(vocab_size=v, input_seq_len=t, num_kv_pairs=k, num_examples=50,
                          num_passes=num_passes, query_start=q, seed=3)
    assert inputs.shape == labels.shape == (50, t) and inputs.dtype == labels.dtype == np.int32
    c = 2 * k * num_passes
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert np.all((keys >= 1) & (keys < v // 2)) and np.all((values >= v // 2) & (values < v))
        assert np.array_equal(x[:c], np.tile(x[:2 * k], num_passes))
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == k and np.all(pos >= q) and np.all((pos - q) % 2 == 0)
        for p in pos:
            key_at = np.flatnonzero(x[:p] == x[p])
            assert np.all(key_at < c) and np.all(key_at % 2 == 0)  # the key only in the context
            assert y[p] == x[key_at[-1] + 1]  # label = the value paired with the query key
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())
        assert np.all(np.delete(x[c:], pos - c) == 0)  # filler between context and queries
    long_gaps = mqar(vocab_size=v, input_seq_len=t, num_kv_pairs=k, num_examples=50,
                     power_a=10.0, num_passes=num_passes, query_start=q, seed=3)[1]
    positions = [np.nonzero(y != IGNORE_INDEX)[1] for y in (labels, long_gaps)]
    assert np.mean(positions[0]) < np.mean(positions[1])  # a = 0.01 favours short gaps from q


def test_mqar_query_start_is_deterministic_and_defaults_to_the_reference():
    far = dict(MQAR_SMALL, query_start=20)
    a, b, c = mqar(**far, seed=7), mqar(**far, seed=7), mqar(**far, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    context = 2 * MQAR_SMALL["num_kv_pairs"]
    for x, y in zip(mqar(**MQAR_SMALL, seed=7), mqar(**MQAR_SMALL, query_start=context, seed=7)):
        np.testing.assert_array_equal(x, y)
    noisy = mqar(**far, seed=7, random_non_queries=True)
    np.testing.assert_array_equal(noisy[1], a[1])


@pytest.mark.parametrize("query_start, match", [
    (7, r"query_start must lie in \[2\*num_kv_pairs\*num_passes, input_seq_len - 2\*num_kv_pairs\]"
        r" = \[8, 24\].*got query_start=7 with input_seq_len=32, num_kv_pairs=4, num_passes=1"),
    (25, r"= \[8, 24\].*got query_start=25"),
    (2.5, r"query_start must be an integer or None, got 2.5"),
])
def test_mqar_query_start_that_does_not_fit_raises(query_start, match):
    with pytest.raises(ValueError, match=match):
        mqar(**MQAR_SMALL, query_start=query_start)


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab_size=32, input_seq_len=32, num_kv_pairs=2), "V > L"),
    (dict(vocab_size=64, input_seq_len=31, num_kv_pairs=2), "even"),
    (dict(vocab_size=64, input_seq_len=16, num_kv_pairs=5), r"\*2 <= input_seq_len"),
    (dict(vocab_size=64, input_seq_len=16, num_kv_pairs=2, num_passes=4), r"2\*4"),
    (dict(vocab_size=64, input_seq_len=16, num_kv_pairs=0), "num_kv_pairs must be >= 1, got 0"),
    (dict(vocab_size=64, input_seq_len=16, num_kv_pairs=2, power_a=0.0), "power_a"),
])
def test_mqar_constraints_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqar(num_examples=1, **kwargs)


@pytest.mark.parametrize("fn, kwargs, v_real", [
    (in_context_recall, dict(vocab_size=16), 16),
    (noisy_in_context_recall, dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.4), 16),
])
def test_in_context_recall_probes(fn, kwargs, v_real):
    inputs, targets = fn(seq_len=64, num_examples=40, seed=0, **kwargs)
    _, train_targets = fn(seq_len=64, num_examples=40, seed=0, training=True, **kwargs)
    assert inputs.shape == targets.shape == (40, 64) and inputs.dtype == np.int32
    for x, y, y_train in zip(inputs, targets, train_targets):
        seen = {}
        for i in range(0, 64, 2):
            k, v = int(x[i]), int(x[i + 1])
            if k >= v_real:  # a noise slot: two noise tokens, never a target
                assert v >= v_real and y[i] == IGNORE_INDEX and y_train[i - 1] == IGNORE_INDEX
                continue
            assert k < v_real // 2 <= v < v_real
            assert y[i] == (seen[k] if k in seen else IGNORE_INDEX)
            assert seen.setdefault(k, v) == v  # a key keeps its value within a sequence
        assert y[-2] != IGNORE_INDEX  # the final slot is a forced probe
        probed = y != IGNORE_INDEX
        assert np.array_equal(y[probed], y_train[probed])  # eval targets are next-token targets
        assert np.array_equal(y_train[:-1][y_train[:-1] != IGNORE_INDEX],
                              x[1:][y_train[:-1] != IGNORE_INDEX])


def test_fuzzy_in_context_recall_probe():
    v, t, k = 16, 64, 3
    inputs, targets = fuzzy_in_context_recall(v, t, 30, seed=0, k_motif_size=k, v_motif_size=3)
    assert inputs.shape == targets.shape == (30, t)
    for x, y in zip(inputs, targets):
        pos = np.flatnonzero(y != IGNORE_INDEX)
        n_val = len(pos)
        assert 1 <= n_val <= 3 and pos.tolist() == list(range(t - 1 - n_val, t - 1))
        value = x[t - n_val:]
        assert np.array_equal(y[pos], value)
        key = x[t - n_val - k:t - n_val]
        assert np.all(key < (v - 1) // 2) and len(set(key.tolist())) == k
        assert np.all((value >= (v - 1) // 2) & (value < v - 1))
        probe, body = np.concatenate([key, value]).tolist(), x[:t - n_val - k].tolist()
        assert any(body[i:i + len(probe)] == probe for i in range(len(body)))  # planted earlier
        first = int(np.argmax(x != v - 1))
        assert np.all(x[:first] == v - 1) and np.all(x[first:] != v - 1)  # left padding only
    _, train_targets = fuzzy_in_context_recall(v, t, 30, seed=0, training=True)
    assert np.all(train_targets[:, -1] == IGNORE_INDEX)


def test_selective_copying_targets():
    v, t, c = 16, 40, 6
    inputs, targets = selective_copying(v, t, 20, seed=0, num_tokens_to_copy=c)
    _, train_targets = selective_copying(v, t, 20, seed=0, num_tokens_to_copy=c, training=True)
    assert np.array_equal(targets, train_targets)
    for x, y in zip(inputs, targets):
        body = x[:t - c - 1]
        data = body[body != v - 2]
        assert len(data) == c and np.all(data < v - 2)
        assert x[t - c - 1] == v - 1 and np.all(x[t - c:] == v - 2)
        assert np.array_equal(y[t - c:], data) and np.all(y[:t - c] == IGNORE_INDEX)


@pytest.mark.parametrize("name", sorted(set(SYNTHETIC_TASKS) - {"mqar"}))
def test_mad_tasks_deterministic(name):
    fn = SYNTHETIC_TASKS[name]
    a, b, c = fn(num_examples=8, seed=1), fn(num_examples=8, seed=1), fn(num_examples=8, seed=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == a[1].dtype == np.int32


def test_accuracy():
    labels = np.array([[IGNORE_INDEX, 3, 4], [5, IGNORE_INDEX, IGNORE_INDEX]])
    preds = np.array([[0, 3, 0], [5, 1, 1]])
    assert accuracy(preds, labels) == pytest.approx(0.75)  # mean of 1/2 and 1/1
    logits = np.eye(6)[preds]
    assert accuracy(logits, labels) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no labelled position"):
        accuracy(preds, np.full_like(labels, IGNORE_INDEX))
