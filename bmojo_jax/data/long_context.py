"""Long-context evaluation data on real text (docs/design.md section 7d): passkey retrieval,
multi-key needle in a haystack, and language-model windows that score the same tokens at every
context length.

Notation: n examples (rows), t time (the context length, tokens), k needles per example.

Every function here is pure: equal arguments give equal arrays (numpy `default_rng` streams, stable
within a numpy version). A retrieval prompt of t tokens is, in token order,

    prefix | filler ... needle ... filler | question

where the filler is a contiguous run of a token stream (real text, e.g. a held-out split), the
needles are inserted between filler tokens, and the model should continue the question with the
answer's digits. The pieces are tokenized separately and concatenated, so every needle's tokens
sit exactly at its recorded span; a tokenizer that cannot write a piece exactly (one that reads
back as other text, e.g. PTB's word level with no digits and no punctuation) is refused.

A tokenizer is any object with `encode(text) -> int [t]` and `decode(ids) -> str`: a
`data.Corpus`, `data.BPETokenizer` or `data.WordTokenizer`.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

from bmojo_jax.config import check_choice
from bmojo_jax.data.synthetic import IGNORE_INDEX

# Passkey retrieval, Mohtashami and Jaggi 2023 ("Landmark Attention", arXiv 2305.16300): their
# prompt, with real text as the filler instead of their repeated "The grass is green..." lines
# (our choice, as the task asks for real text).
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                  "memorize them. I will quiz you about the important information there.\n")
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5  # the paper's keys have up to 5 digits

# Multi-key needle in a haystack: the templates of RULER's MK-NIAH (Hsieh et al. 2024, arXiv
# 2404.06654) with word keys and 7-digit values; the keys are drawn from this list (our choice).
NEEDLE_PREFIX = ("Some special magic numbers are hidden within the following text. Make sure to "
                 "memorize it. I will quiz you about the numbers afterwards.\n")
NEEDLE_TEXT = "\nOne of the special magic numbers for {key} is: {value}.\n"
NEEDLE_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
                   "The special magic number for {key} mentioned in the provided text is")
NEEDLE_KEYS = ("apple", "river", "garden", "window", "candle", "harbour", "meadow", "lantern",
               "mirror", "violin", "forest", "bridge", "teacup", "compass", "feather", "pebble",
               "ribbon", "saddle", "thimble", "orchard", "kettle", "anchor", "blanket", "cottage")
VALUE_DIGITS = 7  # RULER's values


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalBatch:
    """Retrieval prompts of one context length and one depth.

    Attributes:
      inputs: int32 [n, t] prompts; the model continues each with its answer.
      answers: n strings of digits, the answer of each row (written after a space in the needle).
      needle_spans: int64 [n, k, 2], the [start, stop) token span of each needle in `inputs`;
        needle 0 is the one asked for (passkey: k = 1).
      needle_depths: float64 [n, k], the fraction of the filler tokens that precede each needle
        (0: right after the prefix, 1: right before the question).
      depth: the requested depth of the asked needle, in [0, 1].
    """

    inputs: np.ndarray
    answers: tuple[str, ...]
    needle_spans: np.ndarray
    needle_depths: np.ndarray
    depth: float


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _encode_exact(tokenizer, text: str) -> np.ndarray:
    """int32 [t] ids of `text`; ValueError unless they decode back to exactly `text`."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    back = tokenizer.decode(ids)
    _require(back == text, f"the tokenizer cannot write {text!r} exactly (it reads back as "
             f"{back!r}): the retrieval tasks need a lossless tokenizer, e.g. the byte-level BPE "
             f"of the austen, shakespeare, books and text_files corpora (PTB's word-level "
             f"tokenizer has no digits and no punctuation).")
    return ids


def _check_common(filler, length, depth, num_examples, seed) -> np.ndarray:
    filler = np.asarray(filler)
    _require(filler.ndim == 1 and np.issubdtype(filler.dtype, np.integer),
             f"filler must be a 1-D integer token stream, got dtype {filler.dtype} and shape "
             f"{filler.shape}.")
    _require(_is_int(length) and length >= 1, f"length={length!r}: must be an integer >= 1 "
             f"(tokens).")
    _require(isinstance(depth, (int, float, np.floating)) and 0 <= depth <= 1,
             f"depth={depth!r}: must be a number in [0, 1] (the fraction of the filler before the "
             f"needle).")
    _require(_is_int(num_examples) and num_examples >= 1,
             f"num_examples={num_examples!r}: must be an integer >= 1.")
    _require(_is_int(seed) and seed >= 0, f"seed={seed!r}: must be an integer >= 0.")
    return filler


def _point(fraction: float, n_filler: int) -> int:
    """The filler index at `fraction` of n_filler tokens, rounded half up."""
    return int(np.floor(fraction * n_filler + 0.5))


def _assemble(length, filler, u, prefix, needles, depths, question):
    """(tokens int32 [t], spans int64 [k, 2], realized depths [k]): the prompt of one example.

    `depths[j]` places needle j after round(depths[j] * F) of the F filler tokens (ties in
    position keep the needles' order); the filler is filler[o : o + F] with
    o = floor(u * (len(filler) - F + 1)), u in [0, 1)."""
    n_filler = length - len(prefix) - sum(len(x) for x in needles) - len(question)
    _require(n_filler >= 1, f"length={length} leaves no room for filler: the prompt's prefix, "
             f"needles and question take {length - n_filler} tokens; use a length above that.")
    _require(len(filler) >= n_filler, f"the filler holds {len(filler)} tokens, fewer than the "
             f"{n_filler} a prompt of length={length} needs: give a longer filler stream or a "
             f"shorter length.")
    offset = int(np.floor(u * (len(filler) - n_filler + 1)))
    points = [_point(d, n_filler) for d in depths]
    pieces, spans = [prefix], np.zeros((len(needles), 2), np.int64)
    position, cursor = len(prefix), 0
    for j in sorted(range(len(needles)), key=lambda j: (points[j], j)):
        pieces.append(filler[offset + cursor:offset + points[j]])
        position += points[j] - cursor
        spans[j] = position, position + len(needles[j])
        pieces.append(needles[j])
        position, cursor = position + len(needles[j]), points[j]
    pieces += [filler[offset + cursor:offset + n_filler], question]
    tokens = np.concatenate(pieces).astype(np.int32)
    return tokens, spans, np.array(points, np.float64) / n_filler


def passkey(tokenizer, filler, length: int, depth: float, num_examples: int, *, seed: int = 0,
            key_digits: int = KEY_DIGITS) -> RetrievalBatch:
    """Passkey retrieval (Mohtashami and Jaggi 2023): a random number hidden in filler text at
    `depth`, asked for at the end.

    Row i is `PASSKEY_PREFIX`, filler, `PASSKEY_NEEDLE` with a `key_digits`-digit key, filler,
    `PASSKEY_QUESTION`; the answer is the key. Row i draws, from `np.random.default_rng([seed,
    i])`, its key (uniform over the numbers of `key_digits` digits) and then its filler offset u
    (uniform in [0, 1), scaled to the room the filler stream leaves), so row i has the same key
    and relative offset at every length and depth (paired comparisons; our choice).

    Args:
      tokenizer: encodes and decodes text exactly (see the module docstring).
      filler: int [N] token stream of real text in the tokenizer's vocabulary.
      length: t, tokens per prompt, exactly.
      depth: the fraction of the filler before the needle, in [0, 1] (rounded to a token).
      num_examples: n >= 1.
      seed: >= 0.
      key_digits: digits of the key, 1 to 18.

    Returns:
      A `RetrievalBatch` with k = 1.

    Raises:
      ValueError: a bad argument, a prompt text that the tokenizer cannot write exactly, a length
        that leaves no filler, or a filler stream shorter than the prompt needs.
    """
    filler = _check_common(filler, length, depth, num_examples, seed)
    _require(_is_int(key_digits) and 1 <= key_digits <= 18,
             f"key_digits={key_digits!r}: must be an integer in [1, 18].")
    prefix, question = (_encode_exact(tokenizer, s) for s in (PASSKEY_PREFIX, PASSKEY_QUESTION))
    rows, answers, spans, depths = [], [], [], []
    for i in range(num_examples):
        rng = np.random.default_rng([seed, i])
        key = str(rng.integers(10 ** (key_digits - 1), 10 ** key_digits))
        needle = _encode_exact(tokenizer, PASSKEY_NEEDLE.format(key=key))
        tokens, span, realized = _assemble(length, filler, rng.random(), prefix, [needle],
                                           [depth], question)
        rows.append(tokens), answers.append(key), spans.append(span), depths.append(realized)
    return RetrievalBatch(np.stack(rows), tuple(answers), np.stack(spans), np.stack(depths),
                          float(depth))


def multikey_needle(tokenizer, filler, length: int, depth: float, num_examples: int, *,
                    seed: int = 0, num_needles: int = 4,
                    value_digits: int = VALUE_DIGITS) -> RetrievalBatch:
    """Multi-key needle in a haystack (RULER's MK-NIAH, Hsieh et al. 2024): `num_needles`
    key-value needles in filler text, one of them asked for.

    Each needle is `NEEDLE_TEXT` with a distinct key word of `NEEDLE_KEYS` and a distinct
    `value_digits`-digit value. The asked needle (needle 0) sits at `depth`, the others at
    uniform random depths; `NEEDLE_QUESTION` asks for needle 0's key, and the answer is its
    value. Row i draws, from `np.random.default_rng([seed, i])`, in this order: the keys, the
    values, the other needles' depths, the filler offset (as in `passkey`), so row i is the same
    at every length and depth but for the asked needle's place (our choice).

    Args:
      tokenizer, filler, length, depth, num_examples, seed: as in `passkey`.
      num_needles: k, 1 to len(NEEDLE_KEYS).
      value_digits: digits of each value, 1 to 18; at least k values must exist.

    Returns:
      A `RetrievalBatch`.

    Raises:
      ValueError: as in `passkey`, or a bad num_needles or value_digits.
    """
    filler = _check_common(filler, length, depth, num_examples, seed)
    _require(_is_int(num_needles) and 1 <= num_needles <= len(NEEDLE_KEYS),
             f"num_needles={num_needles!r}: must be an integer in [1, {len(NEEDLE_KEYS)}] (the "
             f"number of key words).")
    _require(_is_int(value_digits) and 1 <= value_digits <= 18
             and 9 * 10 ** (value_digits - 1) >= num_needles,
             f"value_digits={value_digits!r}: must be an integer in [1, 18] with at least "
             f"num_needles={num_needles} distinct values.")
    prefix = _encode_exact(tokenizer, NEEDLE_PREFIX)
    rows, answers, spans, depths = [], [], [], []
    for i in range(num_examples):
        rng = np.random.default_rng([seed, i])
        keys = [NEEDLE_KEYS[j] for j in rng.choice(len(NEEDLE_KEYS), num_needles, replace=False)]
        low = 10 ** (value_digits - 1)
        values = [str(low + v) for v in rng.choice(9 * low, num_needles, replace=False)]
        needles = [_encode_exact(tokenizer, NEEDLE_TEXT.format(key=k, value=v))
                   for k, v in zip(keys, values)]
        others = rng.random(num_needles - 1)
        question = _encode_exact(tokenizer, NEEDLE_QUESTION.format(key=keys[0]))
        tokens, span, realized = _assemble(length, filler, rng.random(), prefix, needles,
                                           [depth, *others], question)
        rows.append(tokens), answers.append(values[0]), spans.append(span)
        depths.append(realized)
    return RetrievalBatch(np.stack(rows), tuple(answers), np.stack(spans), np.stack(depths),
                          float(depth))


RETRIEVAL_TASKS = ("passkey", "needle")


RETRIEVAL_LABELS = ("all", "answer")


def retrieval_training_rows(tokenizer, filler, length: int, num_examples: int, *,
                            seed: int = 0, num_needles: int = 4,
                            labels: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Language-model training rows that teach the retrieval tasks: each row is a passkey or
    multi-key needle prompt followed by its answer (" " + digits), `length` tokens in all.
    `labels="all"`: every target labelled (the prompt's text and the answer alike: the row is
    ordinary text to the loss, and the answer is the only part that needs the needle);
    `"answer"`: only the answer's tokens (the prompt's targets are `IGNORE_INDEX`), so the loss of
    these rows is the retrieval alone. Both our choices.

    Row i draws from `np.random.default_rng([seed, i])` its task (passkey or needle, equally
    likely), the asked needle's depth (uniform in [0, 1]) and a prompt seed, and is built by
    `passkey` / `multikey_needle` with that seed, so the key and filler offset are as those
    functions draw them. Keep `seed` apart from the evaluation prompts' seed (and `filler` from
    their held-out text): the training rows then share no prompt with the evaluation.

    Args:
      tokenizer, filler: as in `passkey` (the filler: e.g. the training split's token stream).
      length: t, tokens per row (inputs and targets each); the needle prompt needs about 200.
      num_examples: n >= 1.
      seed: >= 0.
      num_needles: needles per multi-key prompt.
      labels: "all" or "answer" (above).

    Returns:
      (inputs, targets) int32 [n, t]: the row's tokens [0, t) and [1, t + 1), targets
      `IGNORE_INDEX` before the answer with `labels="answer"`.

    Raises:
      ValueError: as in `passkey` / `multikey_needle`, e.g. a length that leaves no filler; a
      `labels` not in `RETRIEVAL_LABELS`.
    """
    _check_common(filler, length, 0.0, num_examples, seed)
    check_choice("labels", labels, RETRIEVAL_LABELS)
    rows, prompt_lengths = [], []
    for i in range(num_examples):
        rng = np.random.default_rng([seed, i])
        task = RETRIEVAL_TASKS[int(rng.integers(len(RETRIEVAL_TASKS)))]
        depth, prompt_seed = float(rng.random()), int(rng.integers(2 ** 31))
        build = (passkey if task == "passkey"
                 else functools.partial(multikey_needle, num_needles=num_needles))
        digits = KEY_DIGITS if task == "passkey" else VALUE_DIGITS
        # The answer is the same at every prompt length; " " + digits is at most one token per
        # character, so the prompt is built again only when the answer takes fewer.
        guess = build(tokenizer, filler, length + 1 - (1 + digits), depth, 1, seed=prompt_seed)
        answer_ids = _encode_exact(tokenizer, " " + guess.answers[0])
        prompt = guess if len(answer_ids) == 1 + digits else build(
            tokenizer, filler, length + 1 - len(answer_ids), depth, 1, seed=prompt_seed)
        rows.append(np.concatenate([prompt.inputs[0], answer_ids]))
        prompt_lengths.append(prompt.inputs.shape[1])
    rows = np.stack(rows).astype(np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:].copy()
    if labels == "answer":  # target j is token j + 1: the answer's first is target prompt - 1
        targets[np.arange(length)[None, :] < np.array(prompt_lengths)[:, None] - 1] = IGNORE_INDEX
    return inputs, targets


# Answer tokens a teacher-forced evaluation row has room for (`answered_rows`): one per character
# of " " + the longest answer, so that every row of either task has one shape per length.
ANSWER_TOKENS = 1 + max(KEY_DIGITS, VALUE_DIGITS)


def answered_rows(tokenizer, batch: RetrievalBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluation prompts followed by their answers, for teacher-forced scoring: row i is
    `batch.inputs[i]` (t tokens), then " " + its answer, then padding (token 0) to t +
    `ANSWER_TOKENS`. Only the answer's tokens that write digits are labelled: a token of
    whitespace alone (the byte-level BPE writes " 86556" as " ", "8", "6", ...) is predictable
    from the question and says nothing about retrieval. Our choice.

    Returns:
      (inputs int32 [n, t + ANSWER_TOKENS - 1]; targets int32 [n, t + ANSWER_TOKENS - 1]: the
      answer's digit tokens as the targets of the positions that predict them, `IGNORE_INDEX`
      elsewhere; in_needle bool [n, t]: the positions of the asked needle where those tokens
      are written as a run, every such run (the passkey needle writes its key twice), or, when
      the needle tokenizes the answer otherwise, every needle token equal to one of them).

    Raises:
      ValueError: an answer the tokenizer cannot write exactly, longer than ANSWER_TOKENS, or
        without a digit.
    """
    n, t = batch.inputs.shape
    rows = np.zeros((n, t + ANSWER_TOKENS), np.int32)
    rows[:, :t] = batch.inputs
    labelled = np.zeros_like(rows, bool)
    in_needle = np.zeros((n, t), bool)
    for i, answer in enumerate(batch.answers):
        ids = _encode_exact(tokenizer, " " + answer)
        _require(len(ids) <= ANSWER_TOKENS, f"the answer {answer!r} takes {len(ids)} tokens, more "
                 f"than ANSWER_TOKENS={ANSWER_TOKENS}.")
        digits = np.array([any(c.isdigit() for c in tokenizer.decode([j])) for j in ids])
        _require(digits.any(), f"the answer {answer!r} has no digit.")
        rows[i, t:t + len(ids)] = ids
        labelled[i, t:t + len(ids)] = digits
        start, stop = batch.needle_spans[i, 0]
        needle, run = batch.inputs[i, start:stop], ids[digits]
        for j in range(len(needle) - len(run) + 1):
            if np.array_equal(needle[j:j + len(run)], run):
                in_needle[i, start + j:start + j + len(run)] = True
        if not in_needle[i].any():
            in_needle[i, start:stop] = np.isin(needle, run)
    targets = np.where(labelled[:, 1:], rows[:, 1:], IGNORE_INDEX).astype(np.int32)
    return rows[:, :-1], targets, in_needle


# Which targets of a copy row are labelled (`copy_training_rows`).
COPY_LABELS = ("all", "copy")
# A copy row's passages are (t + 1) // 32 (at least 2) to (t + 1) // 4 tokens long, each copied
# at most `max_distance` times its length after its start, COPY_MAX_DISTANCE by default (our
# choice: short passages close together make a quarter of the row's targets copies, at distances
# of every scale).
COPY_SPAN_FRACTIONS = (32, 4)
COPY_MAX_DISTANCE = 4


def copy_training_rows(filler, length: int, num_examples: int, *, seed: int = 0,
                       labels: str = "all", max_distance: int = COPY_MAX_DISTANCE
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Training rows of random tokens in which passages are written twice: the copy (induction,
    Olsson et al. 2022) as a training signal, every target labelled. Our choice, for the
    long-context suite (docs/design.md section 7d): the suite's small models learn no induction
    heads from text and retrieval rows in their budget, nor from passages repeated inside text;
    rows of random tokens repeated, mixed into the text batches, teach them (the copy is then the
    only thing to learn in the row). Unlike Olsson's rows (a span, then the same span), the
    passages' lengths and the distances between their copies vary, so that a head attending at
    a fixed distance cannot predict them; both are log-uniform, so that every scale of distance
    is trained: a windowed model learns the copy from the distances inside its window and can
    copy from farther only through its memory. At t = 256 about 27% of a row's targets are copied
    tokens, 56% of them from at most 64 tokens back and 9% from more than 128. Our choice, after
    two designs that taught B'MOJO and SWA no copy: one passage of (t + 1) / 4 to (t + 1) / 2
    tokens (every copy beyond a window of 64), and one passage of 8 to 64 tokens at a
    log-uniform distance (10% of the targets copied, 3% of them inside that window).

    Row i (t + 1 tokens) draws from `np.random.default_rng([seed, i])` units, one after another
    until the row is full (the last one cut at its end): a unit draws a passage length m
    (log-uniform integer in [max(2, (t + 1) // 32), (t + 1) // 4]), a distance d from its first
    copy's start to its second's (log-uniform integer in [m, min(max_distance m, t + 1 - m)]: d
    = m, the passage repeated at once, when max_distance is 1), then its m
    passage tokens and d - m other tokens (all independent uniform draws from the distinct
    tokens of the filler, so every token is one the model embeds); the unit is passage + other +
    passage, d + m tokens.

    Args:
      filler: int [N] token stream (e.g. the training split): its distinct tokens are the
        vocabulary of the rows.
      length: t, tokens per row (inputs and targets each), >= 7.
      num_examples: n >= 1.
      seed: >= 0.
      labels: "all" (training: every target labelled) or "copy" (held-out scoring: only each
        second copy's tokens after its first, which copying predicts and nothing else does).
      max_distance: an integer >= 1, the largest distance between a passage's copies in units
        of its length. At t = 256, 1 makes 45% of the targets copied tokens, all from at most 64
        tokens back; 2 makes 35%, 73% of them from at most 64 back and none from more than 128;
        4 (the default) makes 27%, 57% and 10%.

    Returns:
      (inputs, targets) int32 [n, t]: the row's tokens [0, t) and [1, t + 1), targets
      `IGNORE_INDEX` where unlabelled.

    Raises:
      ValueError: a bad argument, `labels` not in `COPY_LABELS`.
    """
    filler = _check_common(filler, length, 0.0, num_examples, seed)
    check_choice("labels", labels, COPY_LABELS)
    _require(_is_int(max_distance) and max_distance >= 1,
             f"max_distance={max_distance!r}: must be an integer >= 1 (passage lengths).")
    total = length + 1
    shortest, longest = max(2, total // COPY_SPAN_FRACTIONS[0]), total // COPY_SPAN_FRACTIONS[1]
    _require(longest >= 2, f"length={length}: copy rows need at least 7 tokens.")
    vocabulary = np.unique(filler)
    rows = np.zeros((num_examples, total), np.int32)
    copied = np.zeros((num_examples, total), bool)  # tokens of a second copy after its first
    for i in range(num_examples):
        rng, start = np.random.default_rng([seed, i]), 0
        while start < total:
            m = _log_uniform(rng, shortest, longest)
            d = _log_uniform(rng, m, min(max_distance * m, total - m))
            passage = vocabulary[rng.integers(len(vocabulary), size=m)]
            other = vocabulary[rng.integers(len(vocabulary), size=d - m)]
            unit = np.concatenate([passage, other, passage])[:total - start]
            rows[i, start:start + len(unit)] = unit
            copied[i, start + d + 1:start + len(unit)] = True
            start += len(unit)
    targets = rows[:, 1:].copy()
    if labels == "copy":
        targets[~copied[:, 1:]] = IGNORE_INDEX
    return rows[:, :-1], targets


def _log_uniform(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high] whose logarithm is uniform (floor of exp of a uniform draw)."""
    return min(high, int(np.exp(rng.uniform(np.log(low), np.log(high + 1)))))


def repeated_span(vocabulary, span: int, num_examples: int, *, seed: int = 0) -> np.ndarray:
    """Olsson et al.'s (2022, section 2) rows for the copy test: `span` random tokens, then the
    same `span` again, so the second copy is predictable only by copying.

    Args:
      vocabulary: int [V] the tokens to draw from (uniformly, independently).
      span: tokens per copy, >= 2.
      num_examples: n >= 1.
      seed: the numpy seed; the draws are `np.random.default_rng(seed).integers(V, size=(n,
        span))`.

    Returns:
      int32 [n, 2 span].

    Raises:
      ValueError: a bad argument.
    """
    vocabulary = np.asarray(vocabulary)
    _require(vocabulary.ndim == 1 and vocabulary.size >= 1 and
             np.issubdtype(vocabulary.dtype, np.integer),
             f"vocabulary: must be a non-empty 1-D int array; got {vocabulary.dtype} "
             f"{vocabulary.shape}.")
    _require(_is_int(span) and span >= 2, f"span={span}: must be an integer >= 2.")
    _require(_is_int(num_examples) and num_examples >= 1,
             f"num_examples={num_examples}: must be an integer >= 1.")
    _require(_is_int(seed) and seed >= 0, f"seed={seed}: must be an integer >= 0.")
    tokens = vocabulary[np.random.default_rng(seed).integers(len(vocabulary),
                                                             size=(num_examples, span))]
    return np.concatenate([tokens, tokens], axis=1).astype(np.int32)


def copy_test_rows(vocabulary, length: int, num_examples: int, *,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The copy test at a context length: `repeated_span` rows with span s = length // 2 + 1,
    cut to length + 1 tokens, only the second copy's predictable tokens labelled, so a model's
    accuracy on them says whether it copies from s tokens back (our choice, for the long-context
    suite: retrieval from beyond a memory's reach without a prompt format to learn).

    Args:
      vocabulary: int [V] the tokens to draw from.
      length: t, tokens per row (inputs and targets each), >= 3.
      num_examples: n >= 1; seed: >= 0.

    Returns:
      (inputs, targets) int32 [n, t]; targets[:, j] is `IGNORE_INDEX` for j < s (the first copy
      and the second's first token, which nothing predicts) and the copied token for j >= s.

    Raises:
      ValueError: a bad argument.
    """
    _require(_is_int(length) and length >= 3, f"length={length}: must be an integer >= 3.")
    span = length // 2 + 1
    rows = repeated_span(vocabulary, span, num_examples, seed=seed)[:, :length + 1]
    targets = rows[:, 1:].copy()
    targets[:, :span] = IGNORE_INDEX
    return rows[:, :-1], targets


def answer_correct(continuation: str, answer: str) -> bool:
    """Whether a continuation starts with the answer's digits, after optional whitespace (so
    "71432.", " 71432" and " 714320" are right, "7143", "71433" and "the 71432" are wrong).
    What follows the answer is not judged: Mohtashami and Jaggi 2023 generate as many tokens as
    the answer has and compare those; our training rows end with the answer, so a model never
    learns what comes after it. Independent of how the digits were tokenized."""
    return re.match(r"\s*" + re.escape(answer), continuation) is not None


# --------------------------------------------------------------------------------------------------
# Perplexity against context length
# --------------------------------------------------------------------------------------------------


def scoring_ends(doc_starts, n_tokens: int, max_length: int, score_tokens: int,
                 num_windows: int) -> np.ndarray:
    """Where the scored windows end: the same positions serve every context length up to
    `max_length`, so that longer contexts are compared on the same tokens.

    A window ending at E has inputs tokens[E - L : E] and targets tokens[E - L + 1 : E + 1], and
    only its last `score_tokens` targets are scored (`scored_windows`). Every window stays inside
    one document (our choice: the context of a scored token is that document's own past). The
    documents are taken longest first (ties: the earlier); in each, E runs from start + max_length
    in steps of `score_tokens` while E + 1 <= its end, so the scored spans are consecutive and
    disjoint; the first `num_windows` such E are returned (fewer if the documents run out).

    Args:
      doc_starts: int [D] offsets of the documents in the stream: 0 first, strictly increasing
        (`data.Corpus.doc_starts[split]`).
      n_tokens: N, tokens in the stream (the last document ends there).
      max_length: the longest context to be evaluated (tokens).
      score_tokens: S, targets scored per window, 1 <= S <= max_length.
      num_windows: the most windows wanted, >= 1.

    Returns:
      int64 [n] window ends E, 1 <= n <= num_windows.

    Raises:
      ValueError: bad arguments, or no document longer than max_length tokens.
    """
    starts = np.asarray(doc_starts)
    _require(starts.ndim == 1 and len(starts) >= 1 and np.issubdtype(starts.dtype, np.integer)
             and starts[0] == 0 and bool(np.all(np.diff(starts) > 0)),
             f"doc_starts must be 1-D integer offsets starting at 0 and strictly increasing, got "
             f"{starts!r}.")
    _require(_is_int(n_tokens) and n_tokens > starts[-1],
             f"n_tokens={n_tokens!r}: must be an integer above the last document start "
             f"{int(starts[-1])}.")
    _require(_is_int(max_length) and max_length >= 1,
             f"max_length={max_length!r}: must be an integer >= 1 (tokens).")
    _require(_is_int(score_tokens) and 1 <= score_tokens <= max_length,
             f"score_tokens={score_tokens!r}: must be an integer in [1, max_length={max_length}].")
    _require(_is_int(num_windows) and num_windows >= 1,
             f"num_windows={num_windows!r}: must be an integer >= 1.")
    stops = np.append(starts[1:], n_tokens)
    order = sorted(range(len(starts)), key=lambda d: (-(stops[d] - starts[d]), d))
    ends = []
    for d in order:
        ends += range(starts[d] + max_length, stops[d], score_tokens)
        if len(ends) >= num_windows:
            break
    longest = int(max(stops - starts))
    _require(bool(ends), f"no document holds max_length + 1 = {max_length + 1} tokens (the longest "
             f"holds {longest}): evaluate contexts of at most {longest - 1} tokens.")
    return np.array(ends[:num_windows], np.int64)


def scored_windows(tokens, ends, length: int, score_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Language-model windows of `length` tokens that end at `ends`, scoring only the last
    `score_tokens` targets of each.

    Args:
      tokens: int [N] token stream.
      ends: int [n] window ends E (`scoring_ends`), with length <= E < N.
      length: L, context tokens per window.
      score_tokens: S, 1 <= S <= L.

    Returns:
      inputs int32 [n, L] = tokens[E - L : E]; targets int32 [n, L] = tokens[E - L + 1 : E + 1]
      with the first L - S columns set to `IGNORE_INDEX` (-100). For every L, the scored targets
      are tokens[E - S + 1 : E + 1].

    Raises:
      ValueError: bad arguments or a window outside the stream.
    """
    tokens, ends = np.asarray(tokens), np.asarray(ends)
    _require(_is_int(length) and length >= 1, f"length={length!r}: must be an integer >= 1.")
    _require(_is_int(score_tokens) and 1 <= score_tokens <= length,
             f"score_tokens={score_tokens!r}: must be an integer in [1, length={length}].")
    _require(ends.ndim == 1 and len(ends) >= 1 and np.issubdtype(ends.dtype, np.integer),
             f"ends must be a non-empty 1-D integer array, got {ends!r}.")
    _require(bool(np.all(ends >= length)) and bool(np.all(ends < len(tokens))),
             f"every window end must lie in [length, len(tokens)) = [{length}, {len(tokens)}), "
             f"got ends from {int(ends.min())} to {int(ends.max())}.")
    index = ends[:, None] - length + np.arange(length)
    inputs, targets = tokens[index].astype(np.int32), tokens[index + 1].astype(np.int32)
    targets[:, :length - score_tokens] = IGNORE_INDEX
    return inputs, targets
