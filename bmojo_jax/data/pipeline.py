"""Data sources of the training loop: the training batch of a step and the evaluation batches of a
split, for a text corpus (`TextData`) or a synthetic task (`SyntheticData`).

Notation: b batch, t time (tokens per window).

`load_data(config)` builds the source a training config names (`bmojo_jax.training.default_config`
describes the fields). Both sources offer the same interface:

    vocab_size                             token ids lie in [0, vocab_size)
    with_accuracy                          evaluation also reports `accuracy` (synthetic tasks)
    fingerprints                           {split: sha256 hex digest} of the data (text corpora:
                                           every split's text; synthetic tasks: the training set)
    train_batch(step)                      (inputs, targets) int32 [b, t]
    eval_batches(split, batch_size, t)     [(inputs, targets) int32 [b, t]] covering the split
    retrieval_batches(split, batch_size)   [(inputs, targets) int32 [b, t]]: held-out retrieval
                                           rows, only the answers labelled ([] without them)
    copy_batches(split, batch_size)        the same for held-out copy rows, only the copied
                                           tokens labelled ([] without them)
    n_bytes(split)                         UTF-8 bytes of the split, or None where unknown

Exact resume: the training batch of a step is a pure function of (step, seed) (and of whether
the step is in the copy-only phase, which the training loop decides from the validation history
its checkpoints keep), so a run restarted from a checkpoint of step s reads the same batches as an
uninterrupted one, with no iterator state.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Sequence

import ml_collections
import numpy as np

from bmojo_jax.config import check_choice
from bmojo_jax.data.long_context import (COPY_MAX_DISTANCE, RETRIEVAL_LABELS,
                                         copy_training_rows, retrieval_training_rows)
from bmojo_jax.data.synthetic import IGNORE_INDEX, SYNTHETIC_TASKS
from bmojo_jax.data.text import SPLITS, lm_batch, lm_eval_batches, load_corpus

# Training batches built when a TextData with retrieval rows starts, so that a seq_len too short for
# the longer prompts (their length varies with the keys drawn) fails then, not mid-run (our choice).
RETRIEVAL_CHECK_STEPS = 16
# Held-out retrieval rows (and copy rows) of every evaluation split when a TextData trains on them
# (`TextData.retrieval_batches`, `TextData.copy_batches`; our choice: 64 rows give the accuracy to
# +- 6 points), seeded apart from the training rows (whose seeds are drawn below 2**31).
RETRIEVAL_EVAL_EXAMPLES = 64
RETRIEVAL_EVAL_SEED = 2 ** 31

# The length argument of each synthetic generator: MQAR keeps the Zoology name.
SEQ_LEN_ARGUMENTS = {
    "mqar": "input_seq_len",
    "in_context_recall": "seq_len",
    "noisy_in_context_recall": "seq_len",
    "fuzzy_in_context_recall": "seq_len",
    "selective_copying": "seq_len",
}


class TextData:
    """A tokenized corpus (`load_corpus`): random training windows (`lm_batch`) and contiguous
    evaluation windows (`lm_eval_batches`)."""

    with_accuracy = False

    def __init__(self, name: str, *, batch_size: int, seq_len: int, seed: int = 0,
                 path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 split_seed: int = 0, bpe_vocab_size: int = 4096, tokenizer=None,
                 retrieval_fraction: float = 0.0, retrieval_labels: str = "all",
                 copy_fraction: float = 0.0, copy_only_steps: int = 0,
                 copy_max_distance: int = COPY_MAX_DISTANCE):
        """
        Args:
          name: one of `CORPORA`.
          batch_size, seq_len: b and t of the training batches.
          seed: training-window order.
          path: "text_files" only: a directory of .txt files or a list of files.
          split_seed: the document split (`split_documents`).
          bpe_vocab_size: BPE vocabulary of the non-PTB corpora.
          tokenizer: None, or a training run's own tokenizer (`load_corpus`).
          retrieval_fraction: the fraction of each training batch, round(fraction * b) rows (the
            first ones), that are passkey / needle prompts with their answers in the training
            split's text (`long_context.retrieval_training_rows`) instead of plain windows; 0:
            none. Evaluation batches stay plain text.
          retrieval_labels: which targets of those rows are labelled, "all" or "answer"
            (`long_context.retrieval_training_rows`).
          copy_fraction: the fraction of each training batch, round(fraction * b) rows (after
            the retrieval rows), that are random tokens of the training split's vocabulary with
            one passage written twice (`long_context.copy_training_rows`); 0: none.
          copy_only_steps: the batches of training steps 0 .. copy_only_steps - 1 are copy rows
            only; the fractions apply from then on (a curriculum: the copy is learned first).
          copy_max_distance: the copy rows' largest distance between a passage's copies, in
            passage lengths (`long_context.copy_training_rows`' max_distance), in training and
            in the held-out copy rows alike.

        Raises:
          MissingDataError: the corpus is not installed; ValueError, FileNotFoundError: as
          `load_corpus`; ValueError: a retrieval_labels not in `RETRIEVAL_LABELS`, a
          retrieval_fraction or copy_fraction outside [0, 1] or the two above 1 together, a
          copy_only_steps not an integer >= 0, a copy_max_distance not an integer >= 1, a
          retrieval_fraction above 0 with a
          tokenizer that cannot write the prompts exactly (PTB) or a seq_len too short for the
          prompts of the first `RETRIEVAL_CHECK_STEPS` batches (leave room: the prompts' length
          varies with their keys).
        """
        _check_batch(batch_size, seq_len)
        check_row_mix(retrieval_fraction, copy_fraction, copy_only_steps, copy_max_distance)
        check_choice("retrieval_labels", retrieval_labels, RETRIEVAL_LABELS)
        self.corpus = load_corpus(name, path=path, seed=split_seed, vocab_size=bpe_vocab_size,
                                  tokenizer=tokenizer)
        self.vocab_size = self.corpus.vocab_size
        self.fingerprints = dict(self.corpus.fingerprints)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.retrieval_rows = round(retrieval_fraction * batch_size)
        self.retrieval_labels = retrieval_labels
        # round() halves to even: 0.3 and 0.7 of 5 rows would make 2 + 4
        self.copy_rows = min(round(copy_fraction * batch_size), batch_size - self.retrieval_rows)
        self.copy_only_steps = copy_only_steps
        self.copy_max_distance = copy_max_distance
        # the copy rows' tokens: the training split's distinct tokens, found once (a sort of the
        # whole split at every step otherwise)
        self._copy_vocabulary = (np.unique(self.corpus.train)
                                 if self.copy_rows or copy_only_steps else None)
        self._held_out = {}  # (kind, split) -> (inputs, targets), built on first use
        if self.retrieval_rows or self.copy_rows or copy_only_steps:
            try:  # a setting that cannot work fails here, before training starts
                for step in range(RETRIEVAL_CHECK_STEPS):
                    self.train_batch(copy_only_steps + step)
            except ValueError as error:
                raise ValueError(f"retrieval_fraction={retrieval_fraction}, copy_fraction="
                                 f"{copy_fraction}, copy_only_steps={copy_only_steps} on corpus "
                                 f"{name!r} at seq_len={seq_len}: "
                                 f"{error}") from None

    def train_batch(self, step: int, copy_only: bool | None = None):
        """(inputs, targets) int32 [b, t] of step `step`: a pure function of (step, seed,
        copy_only). The first `retrieval_rows` rows are retrieval prompts
        (`retrieval_training_rows`), the next `copy_rows` copy rows (`copy_training_rows`), both
        seeded by (seed, step); the others random windows (`lm_batch`). With `copy_only` every row
        is a copy row; None: before step `copy_only_steps` (the training loop passes the phase
        that `data.copy_only_until` ended early, `training.copy_phase_end`)."""
        if (step < self.copy_only_steps) if copy_only is None else copy_only:
            return copy_training_rows(self._copy_vocabulary, self.seq_len, self.batch_size,
                                      seed=self._rows_seed(step),
                                      max_distance=self.copy_max_distance)
        inputs, targets = lm_batch(self.corpus.train, self.batch_size, self.seq_len, step,
                                   self.seed)
        n, c = self.retrieval_rows, self.copy_rows
        if not (n or c):
            return inputs, targets
        # lm_batch's inputs and targets are shifted views of one array: unlabelled targets
        # written into one would overwrite tokens of the other
        inputs, targets = inputs.copy(), targets.copy()
        rows_seed = self._rows_seed(step)
        if n:
            inputs[:n], targets[:n] = retrieval_training_rows(
                self.corpus, self.corpus.train, self.seq_len, n, seed=rows_seed,
                labels=self.retrieval_labels)
        if c:
            inputs[n:n + c], targets[n:n + c] = copy_training_rows(
                self._copy_vocabulary, self.seq_len, c, seed=rows_seed,
                max_distance=self.copy_max_distance)
        return inputs, targets

    def _rows_seed(self, step: int) -> int:
        """The seed of step `step`'s retrieval and copy rows: a function of (seed, step)."""
        return int(np.random.default_rng([self.seed, step, 1]).integers(2 ** 31))

    def eval_batches(self, split: str, batch_size: int, seq_len: int):
        """[(inputs, targets) int32 [b, t]] covering the whole split (`lm_eval_batches`)."""
        return lm_eval_batches(getattr(self.corpus, split), batch_size, seq_len)

    def retrieval_batches(self, split: str, batch_size: int):
        """[(inputs, targets) int32 [b, t]]: `RETRIEVAL_EVAL_EXAMPLES` passkey and needle rows
        built from the split's text at the training context t (`retrieval_training_rows`, seed
        `RETRIEVAL_EVAL_SEED`, labels "answer": only the answers' targets labelled), in batches of
        at most `batch_size` rows; [] when this source trains on no retrieval rows."""
        if not self.retrieval_rows:
            return []
        return self._held_out_batches("retrieval", split, batch_size, lambda text: (
            retrieval_training_rows(self.corpus, text, self.seq_len, RETRIEVAL_EVAL_EXAMPLES,
                                    seed=RETRIEVAL_EVAL_SEED, labels="answer")))

    def copy_batches(self, split: str, batch_size: int):
        """[(inputs, targets) int32 [b, t]]: `RETRIEVAL_EVAL_EXAMPLES` copy rows of the split's
        distinct tokens at the training context t (`copy_training_rows`, seed
        `RETRIEVAL_EVAL_SEED`, labels "copy": only the copied tokens labelled), in batches of at
        most `batch_size` rows; [] when this source trains on no copy rows."""
        if self._copy_vocabulary is None:
            return []
        return self._held_out_batches("copy", split, batch_size, lambda text: (
            copy_training_rows(text, self.seq_len, RETRIEVAL_EVAL_EXAMPLES,
                               seed=RETRIEVAL_EVAL_SEED, labels="copy",
                               max_distance=self.copy_max_distance)))

    def _held_out_batches(self, kind: str, split: str, batch_size: int, make_rows):
        """`make_rows(split's tokens)` -> (inputs, targets), built once per (kind, split), in
        batches of at most `batch_size` rows."""
        if (kind, split) not in self._held_out:
            self._held_out[kind, split] = make_rows(getattr(self.corpus, split))
        inputs, targets = self._held_out[kind, split]
        return [(inputs[i:i + batch_size], targets[i:i + batch_size])
                for i in range(0, len(inputs), batch_size)]

    def n_bytes(self, split: str):
        """UTF-8 bytes of the split, or None where unknown (PTB)."""
        return self.corpus.n_bytes[split] if self.corpus.n_bytes else None


class SyntheticData:
    """A synthetic task: a fixed training set of `num_train` examples, visited in a fresh
    permutation each epoch (seeded by (seed, epoch)); `num_eval` examples per evaluation split."""

    with_accuracy = True

    def __init__(self, name: str, task: dict, *, batch_size: int, seq_len: int, seed: int = 0,
                 num_train: int, num_eval: int, data_seed: int = 0):
        """
        Args:
          name: a task of `SYNTHETIC_TASKS`.
          task: keyword arguments of the generator, `vocab_size` required (e.g. num_kv_pairs,
            MQAR's query_start); the length argument, num_examples and seed are set here.
          batch_size, seq_len: b and t of the training batches.
          seed: the per-epoch permutation of the training set.
          num_train, num_eval: examples in the training set and in each evaluation split.
          data_seed: seed of the training set; the valid and test sets use data_seed + 1 and + 2
            (our choice).

        Raises:
          ValueError: an unknown task, no `vocab_size` in `task`, an argument the generator does
            not take (or one set here), or bad task arguments.
        """
        if name not in SYNTHETIC_TASKS:
            raise ValueError(f"synthetic task {name!r}: allowed values are "
                             f"{', '.join(SYNTHETIC_TASKS)}.")
        if "vocab_size" not in task:
            raise ValueError(f"task={task}: the synthetic task {name!r} needs vocab_size.")
        self.generator, self.length_argument = SYNTHETIC_TASKS[name], SEQ_LEN_ARGUMENTS[name]
        allowed = (set(inspect.signature(self.generator).parameters)
                   - {self.length_argument, "num_examples", "seed"})
        unknown = sorted(set(task) - allowed)
        if unknown:
            raise ValueError(f"task arguments {unknown}: the synthetic task {name!r} does not "
                             f"take them here; allowed: {', '.join(sorted(allowed))} (its "
                             f"{self.length_argument}, num_examples and seed come from seq_len, "
                             f"num_train/num_eval and the data seed).")
        _check_batch(batch_size, seq_len)
        self.task, self.vocab_size = dict(task), task["vocab_size"]
        self.data_seed, self.num_train, self.num_eval = data_seed, num_train, num_eval
        self.batch_size, self.seed = batch_size, seed
        self.train = self._generate(seq_len, num_train, data_seed)
        self.fingerprints = {"train": _array_fingerprint(self.train)}

    def _generate(self, seq_len, num_examples, seed):
        return self.generator(**self.task, **{self.length_argument: seq_len},
                              num_examples=num_examples, seed=seed)

    def train_batch(self, step: int):
        """(inputs, targets) int32 [b, t]: examples step*b .. step*b + b - 1 of the epoch order."""
        inputs, targets = self.train
        n = len(inputs)
        epochs, offsets = np.divmod(np.arange(step * self.batch_size,
                                              (step + 1) * self.batch_size), n)
        index = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            index[chosen] = np.random.default_rng([self.seed, int(epoch)]).permutation(n)[
                offsets[chosen]]
        return inputs[index], targets[index]

    def retrieval_batches(self, split: str, batch_size: int):
        """[]: a synthetic task trains on no retrieval rows."""
        return []

    def copy_batches(self, split: str, batch_size: int):
        """[]: a synthetic task trains on no copy rows."""
        return []

    def eval_batches(self, split: str, batch_size: int, seq_len: int):
        """[(inputs, targets) int32 [b, t]]: `num_eval` examples of the split at length t (for
        "train", the first ones of the training set), the last batch padded with rows of ignored
        targets."""
        _check_batch(batch_size, seq_len)
        if split == "train":
            num, seed = self.num_train, self.data_seed
        else:
            num, seed = self.num_eval, self.data_seed + SPLITS.index(split)
        inputs, targets = (x[:self.num_eval] for x in self._generate(seq_len, num, seed))
        pad = -len(inputs) % batch_size
        inputs = np.pad(inputs, ((0, pad), (0, 0)))
        targets = np.pad(targets, ((0, pad), (0, 0)), constant_values=IGNORE_INDEX)
        return [(inputs[i:i + batch_size], targets[i:i + batch_size])
                for i in range(0, len(inputs), batch_size)]

    def n_bytes(self, split: str):
        """None: synthetic examples have no byte count."""
        return None


def check_row_mix(retrieval_fraction, copy_fraction, copy_only_steps=0,
                  copy_max_distance=COPY_MAX_DISTANCE, prefix: str = "") -> None:
    """ValueError naming the field and its value unless retrieval_fraction and copy_fraction
    are numbers in [0, 1] with a sum of at most 1 (fractions of one training batch),
    copy_only_steps an integer >= 0 and copy_max_distance an integer >= 1; `prefix` goes before
    the names in the message (e.g. "config.data.")."""
    for name, value, low, unit in (("copy_only_steps", copy_only_steps, 0, "training steps"),
                                   ("copy_max_distance", copy_max_distance, 1,
                                    "passage lengths")):
        if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                and value >= low):
            raise ValueError(f"{prefix}{name}={value!r}: must be an integer >= {low} ({unit}).")
    for name, value in (("retrieval_fraction", retrieval_fraction),
                        ("copy_fraction", copy_fraction)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                and 0 <= value <= 1):
            raise ValueError(f"{prefix}{name}={value!r}: must be a number in [0, 1] (the "
                             f"fraction of each training batch).")
    if retrieval_fraction + copy_fraction > 1:
        raise ValueError(f"{prefix}retrieval_fraction={retrieval_fraction} and "
                         f"{prefix}copy_fraction={copy_fraction}: together at most 1 (fractions "
                         f"of one training batch).")


def _check_batch(batch_size, seq_len) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1.")


def _array_fingerprint(arrays) -> str:
    """sha256 hex digest of arrays' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_data(config: ml_collections.ConfigDict, tokenizer=None) -> TextData | SyntheticData:
    """The data source of a training config: `SyntheticData` for the tasks of `SYNTHETIC_TASKS`,
    `TextData` for corpora (tokenized by `tokenizer` when given: a training run's own,
    `data.load_tokenizer`; else as `load_corpus` does).

    Reads config.batch_size, config.seed (training-batch order) and config.data: name, seq_len,
    seed (document split, or synthetic-set seed), path ("text_files": a directory, or a
    comma-separated list of files), bpe_vocab_size, retrieval_fraction, retrieval_labels,
    copy_fraction, copy_only_steps, copy_max_distance, task, num_train, num_eval.

    Raises:
      MissingDataError: a corpus is not installed; ValueError: bad task arguments.
    """
    data = config.data
    common = dict(batch_size=config.batch_size, seq_len=data.seq_len, seed=config.seed)
    if data.name in SYNTHETIC_TASKS:
        return SyntheticData(data.name, dict(data.task), num_train=data.num_train,
                             num_eval=data.num_eval, data_seed=data.seed, **common)
    path = data.path
    if path and "," in path:
        path = [p.strip() for p in path.split(",")]
    return TextData(data.name, path=path, split_seed=data.seed,
                    bpe_vocab_size=data.bpe_vocab_size, tokenizer=tokenizer,
                    retrieval_fraction=data.get("retrieval_fraction", 0.0),
                    retrieval_labels=data.get("retrieval_labels", "all"),
                    copy_fraction=data.get("copy_fraction", 0.0),
                    copy_only_steps=data.get("copy_only_steps", 0),
                    copy_max_distance=data.get("copy_max_distance", COPY_MAX_DISTANCE), **common)
