"""Eidetic-memory diagnostics: does the selection keep the tokens a query needs, and does the layer
read them? (docs/design.md section 7b.)

Notation: b batch, t time, w window (= chunk), c chunks, m eidetic slots, r positions a query
needs.

From a `LanguageModel.eidetic_trace` (per `B` layer: the slots of every chunk and the attention
mass of every query on window, fading and eidetic keys) and a description of the task (which
positions are queries, which positions each query needs, which positions are context), for each
`B` layer:

  selection_recall  the fraction of (query, needed position) pairs whose position sits in the
                    eidetic slots visible to the query's chunk when it is asked;
  slot_precision    the fraction of occupied slots, over the chunks that hold queries, that hold
                    context tokens (rather than filler or repeated query keys);
  attention_mass    the mean softmax weight that queries put on window, fading and eidetic keys;
  recall_ceiling    the best selection recall the knobs allow when every context token is needed:
                    min(1, per_chunk x context chunks / context tokens, slots / context tokens).
                    A chunk dense with surprising tokens contributes at most `eidetic_per_chunk`
                    of them, whatever the rule: this is that ceiling.

One model-level test separates selection from use: `accuracy_by_selection` scores the same trained
model twice, with its own selection rule and with the oracle's scores (the key/value context) handed
in. A model trained with its own rule that stays low under the oracle never learned to read the
slots; a model trained with the oracle that stays high under its own rule shows that rule's
selections are good enough to use. `answer_breakdown` says what the wrong answers are: other
values of the context (retrieval without matching the key: the 1/K plateau) or anything else.

One test is not about the eidetic memory: `induction_test` (Olsson et al. 2022, "In-context
learning and induction heads", section 2) feeds random tokens repeated once and compares the loss
on the second copy with the first: a model with induction heads copies (the second copy's loss
falls far below the first's), one without does not. Every retrieval task (MQAR on text, passkey,
needles) needs this copy.

`mqar_needs` describes an MQAR batch (`data.mqar`: the key/value context at [0, 2 K passes), each
query needs the key and the value of its pair, at their last occurrence in the context);
`retrieval_needs` a long-context passkey or needle prompt followed by its answer (the positions
that write the answer's digits need the needle's tokens of the answer), and
`retrieval_diagnostics` adds the store of a `B` layer that has one (are those tokens among the
stored tokens its chunk retrieved?).
Everything here runs on the host (numpy) on concrete arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmojo_jax import data as data_lib
from bmojo_jax.config import ModelConfig


def mqar_needs(inputs, targets, context_length: int):
    """What each query of an MQAR batch needs.

    Args:
      inputs: int [b, t] tokens; targets: int [b, t], negative where unlabelled (a query is a
        labelled position).
      context_length: C, the tokens of the key/value context at the start (2 K for K pairs, times
        the passes).

    Returns:
      (queries bool [b, t], needed int32 [b, t, 2] (the key's and the value's position in the
      context, -1 where none), context bool [b, t] (positions < C)).

    Raises:
      ValueError: shapes differ, or context_length is outside [2, t].
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} must be the same "
                         f"[batch, time].")
    b, t = inputs.shape
    if not 2 <= context_length <= t:
        raise ValueError(f"context_length={context_length}: must be in [2, t={t}].")
    queries = targets >= 0
    needed = np.full((b, t, 2), -1, np.int32)
    for row in range(b):
        last = {int(inputs[row, j]): j for j in range(0, context_length, 2)}  # key -> position
        for i in np.flatnonzero(queries[row]):
            j = last.get(int(inputs[row, i]))
            if j is not None:
                needed[row, i] = (j, j + 1)
    context = np.broadcast_to(np.arange(t) < context_length, (b, t))
    return queries, needed, context


def recall_ceiling(config: ModelConfig, context_length: int) -> float:
    """min(1, per_chunk x chunks spanned by the context / C, slots / C) (module docstring)."""
    chunks = math.ceil(context_length / config.window)
    return min(1.0, config.eidetic_per_chunk * chunks / context_length,
               config.eidetic_slots / context_length)


def layer_diagnostics(trace: dict, queries, needed, context, window: int) -> dict:
    """The diagnostics of one `B` layer.

    Args:
      trace: one layer's entry of `LanguageModel.eidetic_trace`.
      queries: bool [b, t]; needed: int [b, t, r] (-1 = none); context: bool [b, t].
      window: the layer's window (= chunk), tokens.

    Returns:
      {"selection_recall", "slot_precision": float (NaN when nothing to measure),
       "attention_mass": {"window", "fading", "eidetic": float} (absent without a mass)}.
    """
    slots = np.asarray(trace["memory_positions"])  # [b, c, m]
    queries, needed, context = np.asarray(queries), np.asarray(needed), np.asarray(context)
    rows, cols = np.nonzero(queries)
    visible = slots[rows, cols // window]  # [q, m]
    wanted = needed[rows, cols]  # [q, r]
    present = (wanted[:, :, None] == visible[:, None, :]).any(-1)  # [q, r]
    real = wanted >= 0
    recall = float(present[real].mean()) if real.any() else float("nan")
    chunks = np.unique(np.stack([rows, cols // window], 1), axis=0) if rows.size else np.zeros(
        (0, 2), int)
    held = slots[chunks[:, 0], chunks[:, 1]] if chunks.size else np.zeros((0, 0), int)  # [n, m]
    occupied = held >= 0
    in_context = np.take_along_axis(context[chunks[:, 0]], np.maximum(held, 0), axis=1) if (
        chunks.size) else held.astype(bool)
    precision = float(in_context[occupied].mean()) if occupied.any() else float("nan")
    result = {"selection_recall": recall, "slot_precision": precision}
    if "attention_mass" in trace and rows.size:
        result["attention_mass"] = attention_mass(trace, queries)
    return result


def attention_mass(trace: dict, queries) -> dict:
    """{"window", "fading", "eidetic": float}: the mean softmax weight that the positions of
    `queries` (bool [b, t], at least one True) put on each kind of key, from one layer's entry of
    `LanguageModel.eidetic_trace`; the three sum to 1."""
    mass = np.asarray(trace["attention_mass"])[np.asarray(queries)].mean(0)
    return dict(zip(("window", "fading", "eidetic"), map(float, mass)))


def attention_mass_by_span(trace: dict, edges) -> dict:
    """{"A-B": `attention_mass` of the positions [A, B)} for consecutive `edges` (tokens,
    increasing, within the traced length), for every layer of `LanguageModel.eidetic_trace`:
    where a model looks inside its training context and beyond it, say (edges 0, T, L).

    Raises:
      ValueError: edges not increasing, or beyond the traced length t.
    """
    edges = [int(e) for e in edges]
    t = next(iter(trace.values()))["attention_mass"].shape[1] if trace else edges[-1]
    if any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0 or edges[-1] > t:
        raise ValueError(f"attention_mass_by_span: edges {edges} must increase within [0, {t}] "
                         f"(the traced length).")
    position = np.arange(t)
    spans = {f"{a}-{b}": (position >= a) & (position < b) for a, b in zip(edges, edges[1:])}
    return {layer: {name: attention_mass(entry, np.broadcast_to(
        span, entry["attention_mass"].shape[:2])) for name, span in spans.items()}
        for layer, entry in trace.items()}


def eidetic_diagnostics(model, inputs, targets, context_length: int, *,
                        eidetic_scores=None) -> dict:
    """The diagnostics of every `B` layer of `model` on an MQAR batch.

    Args:
      model: a `LanguageModel`.
      inputs, targets: int [b, t], an MQAR batch (`data.mqar`).
      context_length: C, as in `mqar_needs`.
      eidetic_scores: optional oracle scores [b, t], as in `LanguageModel.forward`.

    Returns:
      {layer index: `layer_diagnostics` + "recall_ceiling"} for every `B` layer with eidetic
      slots; empty without.
    """
    queries, needed, context = mqar_needs(inputs, targets, context_length)
    trace = _trace(model, jnp.asarray(inputs), eidetic_scores)
    ceiling = recall_ceiling(model.config, context_length)
    return {layer: dict(layer_diagnostics(entry, queries, needed, context, model.config.window),
                        recall_ceiling=ceiling) for layer, entry in trace.items()
            if "memory_positions" in entry}  # (a layer with a store but no slots: nothing)


def retrieval_needs(targets, in_needle, needle_spans):
    """What the answer to each long-context retrieval prompt needs, on its answered rows
    (`data.answered_rows` of a `data.RetrievalBatch`: passkey or multi-key needle).

    Args:
      targets: int [n, t'] the answered rows' targets (negative where unlabelled: the labelled
        ones are the answer's digits).
      in_needle: bool [n, t] (t <= t'), the asked needle's positions that write the answer's
        digits; needle_spans: int [n, k, 2], the [start, stop) token span of each needle in the
        prompt, needle 0 the one asked for.

    Returns:
      (queries bool [n, t']: the positions that predict the answer's digits; needed int32
      [n, t', r]: at each query, every position of `in_needle` in its row (r the most in a row,
      -1 pad); context bool [n, t']: the positions of every needle), the arguments of
      `layer_diagnostics`: its selection recall is then the fraction of the needle's answer
      tokens in the memory visible while the answer is written, its precision the fraction of
      that memory's occupied entries holding needle tokens rather than filler. Our choice.

    Raises:
      ValueError: shapes that do not match, a row with no query or no needed position, or a
        span outside [0, t).
    """
    targets, in_needle = np.asarray(targets), np.asarray(in_needle, bool)
    spans = np.asarray(needle_spans)
    n, t = in_needle.shape
    if (targets.ndim != 2 or len(targets) != n or targets.shape[1] < t or spans.ndim != 3
            or len(spans) != n or spans.shape[2] != 2):
        raise ValueError(f"targets {targets.shape} must be [n, t' >= t], in_needle "
                         f"{in_needle.shape} [n, t] and needle_spans {spans.shape} [n, k, 2].")
    queries = targets >= 0
    if n == 0 or not queries.any(1).all() or not in_needle.any(1).all():
        raise ValueError("every row needs a labelled target and a needed position.")
    if (spans < 0).any() or (spans > t).any() or (spans[..., 1] <= spans[..., 0]).any():
        raise ValueError(f"needle_spans must be non-empty [start, stop) spans within [0, {t}].")
    needed = np.full((n, targets.shape[1], int(in_needle.sum(1).max())), -1, np.int32)
    context = np.zeros(targets.shape, bool)
    for row in range(n):
        positions = np.flatnonzero(in_needle[row])
        needed[row, queries[row], :len(positions)] = positions
        for start, stop in spans[row]:
            context[row, start:stop] = True
    return queries, needed, context


def retrieval_diagnostics(model, tokenizer, batch, *, eidetic_scores=None,
                          batch_size: int | None = None) -> dict:
    """The memory diagnostics of every `B` layer of `model` on long-context retrieval prompts
    (`retrieval_needs`): are the needle's answer tokens in the eidetic slots (and, with a store,
    among the stored tokens retrieved) while the answer is written, and where do those positions
    look?

    Args:
      model: a `LanguageModel`; tokenizer: the one that wrote the prompts.
      batch: a `data.RetrievalBatch`.
      eidetic_scores: optional oracle scores float [n, t'] of the answered rows
        (`data.answered_rows`), as in `LanguageModel.forward`.
      batch_size: rows traced at a time (the traces are concatenated; None: all n at once), to
        bound the memory of long prompts.

    Returns:
      {layer index: `layer_diagnostics` of the eidetic slots (absent for a layer without
      slots), "storage_recall" and "storage_precision" for a layer with a store (the same two
      measures on the positions the chunk retrieved), and "reachable": the fraction of the
      needed positions old enough to be kept (at least `eidetic_lag` chunks before the query's
      chunk; a younger one is in the window or not yet selected, so the memory cannot hold it)};
      empty without `B` layers.

    Raises:
      ValueError: as `data.answered_rows`, `retrieval_needs`.
    """
    inputs, targets, in_needle = data_lib.answered_rows(tokenizer, batch)
    queries, needed, context = retrieval_needs(targets, in_needle, batch.needle_spans)
    step = batch_size or len(inputs)
    blocks = [_trace(model, jnp.asarray(inputs[i:i + step]),
                     None if eidetic_scores is None else eidetic_scores[i:i + step])
              for i in range(0, len(inputs), step)]
    trace = {layer: {name: np.concatenate([np.asarray(block[layer][name]) for block in blocks])
                     for name in entry} for layer, entry in blocks[0].items()}
    window, lag = model.config.window, model.config.eidetic_lag
    rows, cols = np.nonzero(queries)
    wanted = needed[rows, cols]  # [q, r]
    old = wanted // window <= (cols // window - lag)[:, None]
    out = {}
    for layer, entry in trace.items():
        result = (layer_diagnostics(entry, queries, needed, context, window)
                  if "memory_positions" in entry else {})
        if "storage_positions" in entry:
            stored = layer_diagnostics({"memory_positions": entry["storage_positions"]}, queries,
                                       needed, context, window)
            result.update(storage_recall=stored["selection_recall"],
                          storage_precision=stored["slot_precision"])
        if "attention_mass" in entry and "attention_mass" not in result:
            result["attention_mass"] = attention_mass(entry, queries)
        out[layer] = dict(result, reachable=float(old[wanted >= 0].mean()))
    return out


def retrieval_selection(model, tokenizer, batch, *, oracle_model=None,
                        batch_size: int | None = None) -> dict:
    """Selection against use on long-context retrieval prompts (a `data.RetrievalBatch`),
    `accuracy_by_selection` on their answered rows (`data.answered_rows`): the answer's digits
    scored teacher-forced with the model's own selection rule, with the oracle's scores (1 at
    the asked needle's answer tokens, -inf elsewhere: nothing else is kept) and with every
    eidetic slot empty. Our diagnostic: a model whose accuracy rises under the oracle is held
    back by what its rule keeps; one that does not rise cannot use the needle even when it is
    kept.

    Args:
      model: a `LanguageModel` with eidetic slots; tokenizer: the one that wrote the prompts.
      batch: a `data.RetrievalBatch`.
      oracle_model: the model that reads the oracle's scores (None: `model`); e.g. the same
        weights with `eidetic_eviction="score"` and `eidetic_per_chunk=eidetic_slots`
        (`training.with_overrides`), so that the needle stays in the slots ("fifo" shows only
        the selections of the last slots / per_chunk chunks before the lag, whatever their
        scores) and is not cut to `eidetic_per_chunk` tokens per chunk.
      batch_size: rows per compiled call (None: all n).

    Returns:
      `accuracy_by_selection`'s {"own", "oracle", "no_slots"} and their "_exact", and
      "oracle_recall": {layer: the oracle's `selection_recall` (`retrieval_diagnostics`): how
      much of the needle the oracle's slots hold, at most slots / needle's answer tokens}.

    Raises:
      ValueError: as `data.answered_rows`.
    """
    inputs, targets, in_needle = data_lib.answered_rows(tokenizer, batch)
    oracle = np.full(inputs.shape, -np.inf, np.float32)
    oracle[:, :in_needle.shape[1]][in_needle] = 1.0
    step = batch_size or len(inputs)
    result = accuracy_by_selection(
        model, [(inputs[i:i + step], targets[i:i + step], oracle[i:i + step])
                for i in range(0, len(inputs), step)], oracle_model=oracle_model)
    kept = retrieval_diagnostics(oracle_model or model, tokenizer, batch, eidetic_scores=oracle,
                                 batch_size=batch_size)
    return dict(result, oracle_recall={layer: d["selection_recall"] for layer, d in kept.items()
                                       if "selection_recall" in d})


def context_scores(inputs, length):
    """Oracle eidetic scores for an MQAR batch: float32 [b, t], 1 at positions < length (the
    key/value context), 0 after; None when length is None (the model's own rule). Our choice: the
    oracle of `LanguageModel.forward(eidetic_scores=...)` for `eidetic_oracle="context"`."""
    if length is None:
        return None
    return jnp.broadcast_to((jnp.arange(inputs.shape[1]) < length).astype(jnp.float32),
                            inputs.shape)


@nnx.jit
def _trace(model, inputs, scores):
    """`model.eidetic_trace(inputs, eidetic_scores=scores)`, compiled once per model structure
    and shape: traced eagerly, every op of every shape compiles a program of its own, and at the
    long-context suite's lengths their mapped code outgrew Linux's default limit of 65,530 memory
    maps per process (an LLVM "Cannot allocate memory" abort)."""
    return model.eidetic_trace(inputs, eidetic_scores=scores)


@nnx.jit
def _predictions(model, inputs, scores):
    """The argmax token int32 [b, t] of `model` on inputs [b, t] with eidetic scores (or None);
    compiled once per model structure and shape, the argmax on the device."""
    return jnp.argmax(model(inputs, eidetic_scores=scores), axis=-1)


def accuracy_by_selection(model, batches, context_length: int | None = None, *,
                          oracle_model=None) -> dict:
    """Accuracy of `model` on MQAR batches with its own selection rule, with the oracle's, and
    with no eidetic slot at all (every score -inf): selection vs use, and how much of the
    accuracy the slots carry.

    Args:
      model: a `LanguageModel` with `B` layers.
      batches: [(inputs, targets)], int [b, t] each, targets negative where unlabelled; or
        [(inputs, targets, oracle_scores float [b, t])], the oracle's scores given with each
        batch.
      context_length: C, for two-item batches: the oracle scores are 1 at positions < C, 0 after
        (as in `context_scores`).
      oracle_model: the model that reads the oracle's scores (None: `model`), e.g. the same
        weights with another eviction (`training.with_overrides`).

    Returns:
      {"own" with the model's `eidetic_selection`, "oracle" with the oracle scores handed in,
      "no_slots" with every slot empty: the fraction of the labelled positions whose argmax is
      the target (pooled over rows); "own_exact", "oracle_exact", "no_slots_exact": the fraction
      of the rows with a labelled position whose every labelled position is right}.

    Raises:
      ValueError: two-item batches without a context_length.
    """
    hits = {"own": 0, "oracle": 0, "no_slots": 0}
    exact = dict.fromkeys(hits, 0)
    labelled = rows = 0
    for inputs, targets, *given in batches:
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        if not given and context_length is None:
            raise ValueError("accuracy_by_selection: give each batch its oracle scores, or a "
                             "context_length.")
        mask = targets >= 0
        labelled += int(mask.sum())
        rows += int(mask.any(1).sum())
        oracle = given[0] if given else context_scores(inputs, context_length)
        for name, m, scores in (("own", model, None), ("oracle", oracle_model or model, oracle),
                                ("no_slots", model, np.full(inputs.shape, -np.inf, np.float32))):
            right = (np.asarray(_predictions(m, jnp.asarray(inputs), scores)) == targets) & mask
            hits[name] += int(right.sum())
            exact[name] += int(((right.sum(1) == mask.sum(1)) & mask.any(1)).sum())
    return {**{name: hit / max(labelled, 1) for name, hit in hits.items()},
            **{f"{name}_exact": count / max(rows, 1) for name, count in exact.items()}}


def answer_breakdown(model, batches, context_length: int, *, oracle: bool = False) -> dict:
    """Where the answers of `model` to MQAR queries come from: a model on the 1/K plateau either
    retrieves some value of the context without matching its key (its wrong answers are other
    values of the context) or does not retrieve at all (keys or other tokens). Our diagnostic.

    Args:
      model: a `LanguageModel` (any preset).
      batches: [(inputs, targets)], int [b, t] each, targets negative where unlabelled; the
        key/value context at [0, C): keys at even positions, values at odd ones (`data.mqar`).
      context_length: C.
      oracle: hand in the oracle's scores (1 at positions < C), as for a model trained with
        `eidetic_oracle="context"`; False: the model's own selection rule.

    Returns:
      Fractions of the labelled positions whose argmax is: {"correct": the target, "other_value":
      a value of the example's context other than the target, "key": a key of the context,
      "elsewhere": any other token} (they sum to 1), and per pair j of the context (in context
      order), "answered": [K] the fraction of the answers that are value j, and "accuracy_by_pair":
      [K] the accuracy on the queries asking key j. A model that matches keys has accuracy near 1
      for every j; one that picks a value whatever the query has accuracy_by_pair near answered.
    """
    counts = dict(correct=0, other_value=0, key=0, elsewhere=0)
    pairs = context_length // 2
    answered, asked, hits = np.zeros(pairs), np.zeros(pairs), np.zeros(pairs)
    for inputs, targets in batches:
        inputs, targets = np.asarray(inputs), np.asarray(targets)
        scores = context_scores(inputs, context_length if oracle else None)
        predicted = np.asarray(_predictions(model, jnp.asarray(inputs), scores))
        for row, i in zip(*np.nonzero(targets >= 0)):
            keys = list(inputs[row, 0:context_length:2])
            values = list(inputs[row, 1:context_length:2])
            p, correct = predicted[row, i], predicted[row, i] == targets[row, i]
            counts["correct" if correct else "other_value" if p in values else
                   "key" if p in keys else "elsewhere"] += 1
            if p in values:
                answered[values.index(p)] += 1
            if inputs[row, i] in keys:
                asked[keys.index(inputs[row, i])] += 1
                hits[keys.index(inputs[row, i])] += correct
    total = max(sum(counts.values()), 1)
    return {**{name: count / total for name, count in counts.items()},
            "answered": (answered / total).tolist(),
            "accuracy_by_pair": (hits / np.maximum(asked, 1)).tolist()}


def induction_test(model, low: int, high: int, *, span: int = 64, batch_size: int = 8,
                   seed: int = 0) -> dict:
    """The repeated-random-tokens test of induction heads (Olsson et al. 2022, section 2).

    Args:
      model: a `LanguageModel` (any callable inputs int32 [b, t] -> logits [b, t, V]).
      low, high: the tokens are drawn uniformly from [low, high) (pick ordinary tokens: no
        special or end-of-text ids).
      span: tokens per copy; each row is span random tokens, then the same span again (t = 2
        span).
      batch_size: rows; seed: numpy seed of the tokens.

    Returns:
      {"first_copy_nll": mean NLL (nats) of the first copy's targets 1 .. span - 1 (nothing to
       copy yet), "second_copy_nll": of the second copy's targets span + 1 .. 2 span - 1 (each
       predictable by copying the token after its earlier occurrence), "copy_accuracy": the
       fraction of those second-copy targets that are the argmax}. Induction: second_copy_nll
       far below first_copy_nll (our choice of summary: the field reports the loss gap).

    Raises:
      ValueError: span < 2, or not 0 <= low < high.
    """
    if span < 2 or not 0 <= low < high:
        raise ValueError(f"induction_test: span={span} must be >= 2 and [low, high) = "
                         f"[{low}, {high}) a non-empty range of token ids >= 0.")
    rows = data_lib.repeated_span(np.arange(low, high), span, batch_size, seed=seed)
    log_probs = np.asarray(jax.nn.log_softmax(model(jnp.asarray(rows)), axis=-1), np.float64)
    nll = -np.take_along_axis(log_probs[:, :-1], rows[:, 1:, None], axis=-1)[..., 0]  # [b, 2s-1]
    predicted = log_probs[:, :-1].argmax(-1)
    return {"first_copy_nll": float(nll[:, :span - 1].mean()),
            "second_copy_nll": float(nll[:, span:].mean()),
            "copy_accuracy": float((predicted[:, span:] == rows[:, span + 1:]).mean())}


__all__ = ["mqar_needs", "recall_ceiling", "layer_diagnostics", "eidetic_diagnostics",
           "retrieval_needs", "retrieval_diagnostics", "retrieval_selection", "context_scores",
           "accuracy_by_selection",
           "answer_breakdown", "induction_test"]
