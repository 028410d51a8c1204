"""Synthetic recall tasks: Zoology MQAR and the MAD recall/copy suite, as seeded numpy generators.

Notation: n examples, t time (sequence length L), V vocabulary size, K key-value pairs.

Every generator returns `(inputs, targets)`, both int32 [n, t]. Targets equal to `IGNORE_INDEX`
(-100) carry no loss and no accuracy. The specifications are in docs/tasks.md; the places where it
is silent are marked "our choice" in the docstrings. Equal arguments give equal arrays (MQAR's
RandomState stream is frozen by numpy; the MAD tasks' Generator streams are stable within a numpy
version).
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --------------------------------------------------------------------------------------------------
# Zoology multi-query associative recall
# --------------------------------------------------------------------------------------------------


def mqar(vocab_size: int = 8192, *, input_seq_len: int, num_kv_pairs: int, num_examples: int,
         power_a: float = 0.01, num_passes: int = 1, random_non_queries: bool = False,
         query_start: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multi-query associative recall (Zoology): the reference generator's algorithm
    (docs/tasks.md), plus a far-query variant.

    Each example is a context `k1 v1 .. kK vK` (tiled `num_passes` times, C = 2*K*num_passes
    tokens) followed by filler 0s; from position `query_start` (default C: right after the context)
    on, each key reappears once, at offset 2*g from `query_start`, with K distinct gaps g drawn with
    p(g) ∝ (g+1)^(a-1). The label of a query sits at the query key's own position (the model emits
    the value as the next token) and equals the value paired with that key. Keys come from
    [1, V/2), values from [V/2, V); token 0 is the filler.

    Far-query variant (our choice): `query_start` > C leaves positions [C, query_start) as filler,
    so every context token is at least query_start - C + 1 positions before every query. For a
    B'MOJO layer of window w, query_start = C + 2*w puts every key/value pair more than 2*w tokens
    (the window and the fading span) before every query.

    Random draws use `np.random.RandomState(seed)` in the reference's order (all examples' keys,
    then all values, then all gaps), so the output reproduces the reference's worked example
    exactly. With `random_non_queries`, every filler 0 of the inputs is replaced by a uniform token
    in [0, V), drawn from the same stream afterwards (our choice of stream; the reference used
    torch).

    Args:
      vocab_size: V, number of token ids; V > input_seq_len.
      input_seq_len: L, even.
      num_kv_pairs: K >= 1, with 2*K*num_passes + 2*K <= L.
      num_examples: n >= 0.
      power_a: a > 0, exponent of the gap power law (0.01 favours short gaps).
      num_passes: P >= 1, times the context is repeated (P > 1: the JRT repeat variant).
      random_non_queries: replace the filler 0s of the inputs by random tokens.
      query_start: q, first position a query may take, C <= q <= L - 2*K (room for K queries at
        even offsets); None = C, the reference generator (equal arrays to q = C).
      seed: seed of the RandomState.

    Returns:
      inputs: int32 [n, L] token ids.
      labels: int32 [n, L]; the paired value at the K query-key positions (all >= q), -100
        elsewhere.

    Raises:
      ValueError: a constraint above is violated (the message names the value and the rule).
    """
    v, t, k, p = vocab_size, input_seq_len, num_kv_pairs, num_passes
    _require(t > 0 and t % 2 == 0, f"input_seq_len must be a positive even number, got {t}")
    _require(v > t, f"vocab_size must exceed input_seq_len (V > L), got V={v} and L={t}")
    _require(k >= 1, f"num_kv_pairs must be >= 1, got {k}")
    _require(p >= 1, f"num_passes must be >= 1, got {p}")
    _require(2 * k * p + 2 * k <= t, f"need num_kv_pairs*2*num_passes + num_kv_pairs*2 <= "
             f"input_seq_len, got {k}*2*{p} + {k}*2 = {2 * k * p + 2 * k} > {t}")
    _require(k <= v // 2 - 1, f"num_kv_pairs must be <= vocab_size//2 - 1 = {v // 2 - 1} "
             f"(distinct keys from [1, V/2)), got {k}")
    _require(power_a > 0, f"power_a must be > 0, got {power_a}")
    _require(num_examples >= 0, f"num_examples must be >= 0, got {num_examples}")
    context_len = 2 * k * p
    q = context_len if query_start is None else query_start
    _require(isinstance(q, (int, np.integer)) and not isinstance(q, bool),
             f"query_start must be an integer or None, got {query_start!r}")
    _require(context_len <= q <= t - 2 * k,
             f"query_start must lie in [2*num_kv_pairs*num_passes, input_seq_len - 2*num_kv_pairs]"
             f" = [{context_len}, {t - 2 * k}] (after the context, with room for K={k} queries at "
             f"even offsets), got query_start={query_start} with input_seq_len={t}, "
             f"num_kv_pairs={k}, num_passes={p}")

    rs = np.random.RandomState(seed)
    key_pool, value_pool = np.arange(1, v // 2), np.arange(v // 2, v)
    keys = np.array([rs.choice(key_pool, k, replace=False) for _ in range(num_examples)],
                    dtype=np.int64).reshape(num_examples, k)
    values = np.array([rs.choice(value_pool, k, replace=False) for _ in range(num_examples)],
                      dtype=np.int64).reshape(num_examples, k)
    space = (t - q) // 2
    gap_p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    gap_p /= gap_p.sum()
    gaps = np.array([rs.choice(space, k, replace=False, p=gap_p) for _ in range(num_examples)],
                    dtype=np.int64).reshape(num_examples, k)

    rows = np.arange(num_examples)[:, None]
    example = np.zeros((num_examples, t + 1), np.int64)
    pairs = np.stack([keys, values], axis=-1).reshape(num_examples, 2 * k)
    example[:, :context_len] = np.tile(pairs, (1, p))
    example[rows, q + 2 * gaps] = keys
    labels = np.full((num_examples, t + 1), IGNORE_INDEX, np.int64)
    labels[rows, q + 2 * gaps + 1] = values
    inputs, labels = example[:, :-1], labels[:, 1:]
    if random_non_queries:
        noise = rs.randint(0, v, size=inputs.shape)
        inputs = np.where(inputs == 0, noise, inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# MAD suite (Poli et al. 2024)
# --------------------------------------------------------------------------------------------------


def _next_token_targets(inputs: np.ndarray, ignored: np.ndarray | None = None) -> np.ndarray:
    """targets[:, i] = inputs[:, i+1]; the last position, and positions whose next token is
    `ignored`, get IGNORE_INDEX."""
    targets = np.full_like(inputs, IGNORE_INDEX)
    targets[:, :-1] = inputs[:, 1:]
    if ignored is not None:
        targets[:, :-1][ignored[:, 1:]] = IGNORE_INDEX
    return targets


def _seen_before(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[n, m] bool: keys[r, i] is valid and equals keys[r, j] for some valid j < i."""
    n, m = keys.shape
    marked = np.where(valid, keys, -1 - np.arange(m))  # invalid slots never match anything
    order = np.argsort(marked, axis=1, kind="stable")
    ordered = np.take_along_axis(marked, order, axis=1)
    repeat = np.zeros((n, m), bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    seen = np.zeros((n, m), bool)
    np.put_along_axis(seen, order, repeat, axis=1)
    return seen & valid


def in_context_recall(vocab_size: int = 16, seq_len: int = 128, num_examples: int = 12800,
                      seed: int = 0, *, noise_vocab_size: int = 0, frac_noise: float = 0.0,
                      training: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MAD in-context recall, multi-query variant (docs/tasks.md "MAD synthetic suite").

    Each sequence is t/2 slots `k v`. With V' = V - noise_vocab_size, keys are drawn uniformly with
    replacement from [0, V'/2) and each key maps to a value in [V'/2, V') through a random
    one-to-one map redrawn per sequence, so a key keeps its value within a sequence. The final slot
    is a forced probe: its key is copied from a uniformly chosen earlier real slot.

    Noise (used by `noisy_in_context_recall`): each slot becomes, with probability `frac_noise`, two
    uniform tokens from the noise vocab [V', V). The first and the final slots are always real
    pairs, so the probe always has an earlier key to recall (our choice).

    Args:
      vocab_size: V, including the noise vocab; V' >= 2.
      seq_len: t, even, >= 4.
      num_examples: n >= 0.
      seed: seed of `np.random.default_rng`.
      noise_vocab_size: number of noise tokens at the top of the vocab.
      frac_noise: probability in [0, 1) that a slot is noise.
      training: False: evaluation targets, the value at each key position whose key appeared in an
        earlier real slot, -100 elsewhere. True: next-token targets (inputs shifted left by one),
        -100 at the last position and where the next token is noise. The inputs do not depend on it.

    Returns:
      inputs, targets: int32 [n, t].

    Raises:
      ValueError: on an invalid argument.
    """
    v_real = vocab_size - noise_vocab_size
    _require(seq_len >= 4 and seq_len % 2 == 0, f"seq_len must be even and >= 4, got {seq_len}")
    _require(noise_vocab_size >= 0, f"noise_vocab_size must be >= 0, got {noise_vocab_size}")
    _require(v_real >= 2, f"vocab_size - noise_vocab_size must be >= 2, got {vocab_size} - "
             f"{noise_vocab_size} = {v_real}")
    _require(0.0 <= frac_noise < 1.0, f"frac_noise must be in [0, 1), got {frac_noise}")
    _require(frac_noise == 0.0 or noise_vocab_size > 0,
             f"frac_noise={frac_noise} > 0 needs noise_vocab_size > 0")
    _require(num_examples >= 0, f"num_examples must be >= 0, got {num_examples}")

    rng = np.random.default_rng(seed)
    n, m = num_examples, seq_len // 2
    num_keys = v_real // 2
    rows = np.arange(n)[:, None]
    value_of = rng.permuted(np.tile(np.arange(num_keys, v_real), (n, 1)), axis=1)
    keys = rng.integers(0, num_keys, size=(n, m))
    real = rng.random((n, m)) >= frac_noise
    real[:, [0, -1]] = True
    # Forced probe: the earlier real slot with the highest random score.
    score = np.where(real[:, :-1], rng.random((n, m - 1)), -1.0)
    keys[:, -1] = keys[np.arange(n), score.argmax(axis=1)]
    values = value_of[rows, keys]
    noise = rng.integers(v_real, vocab_size, size=(n, m, 2)) if noise_vocab_size else None

    slots = np.stack([keys, values], axis=-1)
    if noise is not None:
        slots = np.where(real[..., None], slots, noise)
    inputs = slots.reshape(n, seq_len)
    if training:
        targets = _next_token_targets(inputs, inputs >= v_real)
        return inputs.astype(np.int32), targets.astype(np.int32)
    targets = np.full((n, m, 2), IGNORE_INDEX, np.int64)
    targets[..., 0] = np.where(_seen_before(keys, real), values, IGNORE_INDEX)
    return inputs.astype(np.int32), targets.reshape(n, seq_len).astype(np.int32)


def noisy_in_context_recall(vocab_size: int = 32, seq_len: int = 128, num_examples: int = 12800,
                            seed: int = 0, *, noise_vocab_size: int = 16, frac_noise: float = 0.2,
                            training: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MAD noisy in-context recall: `in_context_recall` with a noise vocab (docs/tasks.md).

    Baseline V=32 including 16 noise tokens, frac_noise 0.2. Arguments, returns and errors as in
    `in_context_recall`.
    """
    return in_context_recall(vocab_size, seq_len, num_examples, seed,
                             noise_vocab_size=noise_vocab_size, frac_noise=frac_noise,
                             training=training)


def fuzzy_in_context_recall(vocab_size: int = 16, seq_len: int = 128, num_examples: int = 12800,
                            seed: int = 0, *, k_motif_size: int = 3, v_motif_size: int = 3,
                            training: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MAD fuzzy in-context recall: keys and values are multi-token motifs (docs/tasks.md).

    Token V-1 is the pad; keys use tokens [0, (V-1)//2) and values [(V-1)//2, V-1). A motif is a
    draw without replacement from its vocab (no token repeats inside a motif). Value motifs have a
    uniform length in 1..v_motif_size. Key motifs have length k_motif_size, or, with `training`, a
    uniform length in 1..k_motif_size (as MAD: "at eval, keys are always full length").

    Per sequence (our choices where docs/tasks.md is silent): a probe pair (full-length key) is
    drawn; then `k v` pairs are drawn until the next one would not fit, a key that repeats reusing
    its earlier value; the probe pair is planted at a uniform slot among them; the probe key and
    value are appended at the end; the sequence is left-padded with V-1 to length t.

    Args:
      vocab_size: V >= 2*k_motif_size + 1 and V >= 2*v_motif_size (motifs without repeats).
      seq_len: t >= 2*(k_motif_size + v_motif_size).
      num_examples: n >= 0.
      seed: seed of `np.random.default_rng`.
      k_motif_size, v_motif_size: maximum motif lengths, >= 1.
      training: False: evaluation targets, the final value motif's tokens at the positions that
        predict them (the last key token and the value tokens but the last), -100 elsewhere.
        True: next-token targets, -100 at the last position and where the next token is the pad.

    Returns:
      inputs, targets: int32 [n, t].

    Raises:
      ValueError: on an invalid argument.
    """
    pad = vocab_size - 1
    num_keys = pad // 2
    _require(min(k_motif_size, v_motif_size) >= 1,
             f"motif sizes must be >= 1, got k={k_motif_size}, v={v_motif_size}")
    _require(num_keys >= k_motif_size and pad - num_keys >= v_motif_size,
             f"vocab_size={vocab_size} too small for motifs without repeats: need (V-1)//2 >= "
             f"k_motif_size={k_motif_size} and V-1-(V-1)//2 >= v_motif_size={v_motif_size}")
    _require(seq_len >= 2 * (k_motif_size + v_motif_size),
             f"seq_len must be >= 2*(k_motif_size + v_motif_size) = "
             f"{2 * (k_motif_size + v_motif_size)}, got {seq_len}")
    _require(num_examples >= 0, f"num_examples must be >= 0, got {num_examples}")

    rng = np.random.default_rng(seed)
    num_values = pad - num_keys

    def motif(first, count, max_len, full):  # a draw without replacement from [first, first+count)
        size = max_len if full else int(rng.integers(1, max_len + 1))
        return tuple((rng.permutation(count)[:size] + first).tolist())

    inputs = np.full((num_examples, seq_len), pad, np.int64)
    targets = np.full((num_examples, seq_len), IGNORE_INDEX, np.int64)
    for row in range(num_examples):
        probe_key = motif(0, num_keys, k_motif_size, True)
        value_of = {probe_key: motif(num_keys, num_values, v_motif_size, False)}
        probe = probe_key + value_of[probe_key]
        budget = seq_len - 2 * len(probe)
        pairs = []
        while True:
            key = motif(0, num_keys, k_motif_size, not training)
            if key not in value_of:
                value_of[key] = motif(num_keys, num_values, v_motif_size, False)
            value = value_of[key]
            if len(key) + len(value) > budget:
                break
            pairs.append(key + value)
            budget -= len(key) + len(value)
        pairs.insert(int(rng.integers(0, len(pairs) + 1)), probe)
        tokens = [tok for pair in pairs + [probe] for tok in pair]
        inputs[row, seq_len - len(tokens):] = tokens
        probe_len = len(value_of[probe_key])
        targets[row, seq_len - 1 - probe_len:seq_len - 1] = inputs[row, seq_len - probe_len:]
    if training:
        targets = _next_token_targets(inputs, inputs == pad)
    return inputs.astype(np.int32), targets.astype(np.int32)


def selective_copying(vocab_size: int = 16, seq_len: int = 256, num_examples: int = 12800,
                      seed: int = 0, *, num_tokens_to_copy: int = 16,
                      training: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MAD selective copying (docs/tasks.md): copy the data tokens, in order, after a copy token.

    Token V-1 is the copy token and V-2 the blank. The first t - c - 1 positions hold the c data
    tokens (uniform with replacement from [0, V-2), our choice) at uniformly chosen positions, in
    order, and blanks elsewhere; then come the copy token and c blanks. The targets are explicit,
    not shifted: the data tokens in order at the last c positions, -100 elsewhere.

    Args:
      vocab_size: V >= 3.
      seq_len: t >= 2*c + 1.
      num_examples: n >= 0.
      seed: seed of `np.random.default_rng`.
      num_tokens_to_copy: c >= 1.
      training: accepted for a uniform signature; training and evaluation targets are the same.

    Returns:
      inputs, targets: int32 [n, t].

    Raises:
      ValueError: on an invalid argument.
    """
    del training  # explicit targets serve both
    c = num_tokens_to_copy
    _require(vocab_size >= 3, f"vocab_size must be >= 3, got {vocab_size}")
    _require(c >= 1, f"num_tokens_to_copy must be >= 1, got {c}")
    _require(seq_len >= 2 * c + 1, f"seq_len must be >= 2*num_tokens_to_copy + 1 = {2 * c + 1}, "
             f"got {seq_len}")
    _require(num_examples >= 0, f"num_examples must be >= 0, got {num_examples}")

    rng = np.random.default_rng(seed)
    copy_token, blank = vocab_size - 1, vocab_size - 2
    n, body = num_examples, seq_len - c - 1
    data = rng.integers(0, vocab_size - 2, size=(n, c))
    positions = np.sort(np.argsort(rng.random((n, body)), axis=1)[:, :c], axis=1)
    inputs = np.full((n, seq_len), blank, np.int64)
    np.put_along_axis(inputs, positions, data, axis=1)
    inputs[:, body] = copy_token
    targets = np.full((n, seq_len), IGNORE_INDEX, np.int64)
    targets[:, body + 1:] = data
    return inputs.astype(np.int32), targets.astype(np.int32)


# The MAD tasks take `training=`; MQAR's labels serve both training and evaluation (as in Zoology).
SYNTHETIC_TASKS = {
    "mqar": mqar,
    "in_context_recall": in_context_recall,
    "noisy_in_context_recall": noisy_in_context_recall,
    "fuzzy_in_context_recall": fuzzy_in_context_recall,
    "selective_copying": selective_copying,
}


def accuracy(logits_or_predictions, labels, ignore_index: int = IGNORE_INDEX) -> float:
    """Zoology/MAD accuracy: per example, the mean over labelled positions of prediction == label;
    then the mean over examples (docs/tasks.md, Zoology metric).

    Examples without any labelled position are left out of the mean (our choice).

    Args:
      logits_or_predictions: float [n, t, V] logits (argmax taken) or int [n, t] predicted ids.
      labels: int [n, t]; `ignore_index` marks unlabelled positions.

    Returns:
      Accuracy in [0, 1] as a Python float.

    Raises:
      ValueError: shapes do not match, or no position is labelled.
    """
    preds, labels = np.asarray(logits_or_predictions), np.asarray(labels)
    if preds.ndim == labels.ndim + 1:
        preds = preds.argmax(axis=-1)
    _require(labels.ndim == 2 and preds.shape == labels.shape,
             f"need labels [n, t] and predictions of the same shape (or logits [n, t, V]), got "
             f"predictions {preds.shape} and labels {labels.shape}")
    mask = labels != ignore_index
    count = mask.sum(axis=1)
    _require(bool(count.any()), "no labelled position (every label is the ignore index)")
    correct = ((preds == labels) & mask).sum(axis=1)
    return float(np.mean(correct[count > 0] / count[count > 0]))
