"""Long-context evaluation of trained checkpoints (docs/design.md section 7d), offline, on real
text:

* passkey retrieval (Mohtashami and Jaggi 2023) and multi-key needle in a haystack (RULER's
  MK-NIAH): accuracy by context length and needle depth, greedy decoding through
  `bmojo_jax.generate` (parallel prefill of the prompt, then decode steps on the fixed-size
  streaming state);
* the copy test (Olsson et al. 2022's repeated random tokens) at every context length L: a span of
  L / 2 + 1 random tokens written twice (`lc.copy_test_rows`); the accuracy on the second copy
  says whether a model copies from L / 2 + 1 tokens back, with no prompt format to learn;
* perplexity against context length on the longest held-out documents, scoring the last
  `score_tokens` of every window so that every length is scored on the same tokens;
* streaming inference at every length: the decoding state's bytes, and tokens/s of the prefill
  and of decode steps after it (one sequence, compiled first, interleaved rounds);
* for a model with `B` layers, the memory diagnostics of every retrieval cell
  (`diagnostics.retrieval_diagnostics`: are the needle's answer tokens in the eidetic slots or
  among the stored tokens retrieved while the answer is written; and, with eidetic slots,
  `diagnostics.retrieval_selection`: the answers teacher-forced with the model's own selection,
  the oracle's and none). They cost, per depth, a compiled traced forward and four more
  (own, oracle, no slots, the oracle traced), and one more compiled model (the oracle's).

The prompts and windows are the pure, seeded functions of `bmojo_jax.data.long_context`.

    python -m experiments.long_context --workdir=workdir/austen_bmojo
    python -m experiments.long_context --workdir=workdir/austen_bmojo,workdir/austen_transformer \\
        --lengths=256,1024,4096,16384 --depths=0,0.5,1 --examples=8 --out_dir=results
    python -m experiments.long_context --workdir=workdir/austen_bmojo --memory_off=eidetic

(`--memory_off=eidetic,storage`: each model that has the memory is evaluated again with it turned
off at inference, the trained weights unchanged: what it reads from that memory.)

Writes OUT/long_context.md (tables, method, command, commit, machine), .json (every number, every
continuation the models wrote) and .png (accuracy heatmaps, length x depth; perplexity against
length). OUT is a new runs/long_context-<timestamp>/ unless --out_dir is given; only an explicit
--out_dir=results writes the committed results.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

import bmojo_jax
from benchmarks import decoding, harness
from bmojo_jax import data as data_lib
from bmojo_jax import diagnostics, training
from bmojo_jax.data import long_context as lc
from experiments import plotting

NAME = "long_context"
TASKS = ("passkey", "needle", "copy", "perplexity", "speed")
RETRIEVAL = {"passkey": "passkey retrieval", "needle": "multi-key needle in a haystack"}
FILLERS = ("test", "austen", "shakespeare")
# The memories `--memory_off` can turn off at inference: the ModelConfig overrides that do it.
MEMORY_OFF = {"eidetic": dict(eidetic_slots=0, eidetic_per_chunk=0),
              "storage": dict(storage_slots=0, storage_topk=0)}
# The speed task: greedy decode steps per timed call, and timed rounds (our choice: enough for a
# median and a spread on a shared machine, seconds per length for the suite's small models).
SPEED_DECODE_STEPS = 16
SPEED_ROUNDS = 3
# What a kept record holds (`evaluate_cached`): raised whenever `evaluate_model` records more or
# measures differently, so that records made before are evaluated again. 2: the retrieval cells'
# memory diagnostics ("memory", "selection") and the speed task's prefills and decodes timed apart;
# 3: those diagnostics measured where the answer's digits are written, the oracle unclipped.
RECORD_FORMAT = 3


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the suite runs (the flags of the same names).

    lengths: context lengths in tokens (None: T x 1, 2, 4, ..., 128 for the models' training
      context T). depths: needle depths in [0, 1]. examples: prompts per (length, depth) cell.
    tasks: a subset of TASKS. num_needles: needles per multi-key prompt (one asked).
    filler: "test" (the held-out test split of the model's corpus) or "austen" / "shakespeare"
      (every document of that corpus, in the model's tokenizer; it may overlap training text).
    score_tokens: targets scored at the end of each perplexity window (None: T // 2).
    windows: perplexity windows (the most; fewer if the documents run out).
    batch_size: sequences per compiled call. seed: the prompts' seed.
    """

    lengths: Optional[tuple] = None
    depths: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    examples: int = 8
    tasks: tuple = TASKS
    num_needles: int = 4
    filler: str = "test"
    score_tokens: Optional[int] = None
    windows: int = 16
    batch_size: int = 4
    seed: int = 0


def check_settings(s: Settings) -> None:
    """Raises ValueError naming the first bad setting, what it was and what is allowed."""
    def require(ok, message):
        if not ok:
            raise ValueError(message)

    def integer(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    require(s.lengths is None or (len(s.lengths) >= 1 and all(integer(n) and n >= 1
                                                              for n in s.lengths)),
            f"--lengths={s.lengths}: must be positive integers (tokens).")
    require(len(s.depths) >= 1 and all(isinstance(d, (int, float)) and 0 <= d <= 1
                                       for d in s.depths),
            f"--depths={s.depths}: must be numbers in [0, 1].")
    require(len(s.tasks) >= 1 and set(s.tasks) <= set(TASKS),
            f"--tasks={','.join(s.tasks)}: allowed values are {', '.join(TASKS)}.")
    require(s.filler in FILLERS, f"--filler={s.filler}: allowed values are {', '.join(FILLERS)}.")
    for name in ("examples", "num_needles", "windows", "batch_size"):
        require(integer(getattr(s, name)) and getattr(s, name) >= 1,
                f"--{name}={getattr(s, name)}: must be an integer >= 1.")
    require(s.score_tokens is None or (integer(s.score_tokens) and s.score_tokens >= 1),
            f"--score_tokens={s.score_tokens}: must be an integer >= 1.")
    require(integer(s.seed) and s.seed >= 0, f"--seed={s.seed}: must be an integer >= 0.")


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


class Model(NamedTuple):
    """A model to evaluate.

    name: what the report calls it and its record file's name (its workdir, for `load`; with
    ", <memory> memory off" after it for `memory_off`); model: the `LanguageModel`;
    tokenizer: the run's tokenizer (`encode`, `decode`); config: its training config
    (`ml_collections.ConfigDict`; read: model_preset, data.name, data.seq_len = the training
    context T); step: its checkpoint's step; corpus: the `data.Corpus` it was trained on (its
    held-out test split).
    """

    name: str
    model: bmojo_jax.LanguageModel
    tokenizer: object
    config: ml_collections.ConfigDict
    step: int
    corpus: data_lib.Corpus


def load(workdir) -> Model:
    """The latest checkpoint of a workdir trained on a text corpus (`bmojo_jax.load`: the model and
    the run's own tokenizer), with that corpus loaded as in training.

    Raises:
      ValueError: the workdir was trained on a synthetic task; FileNotFoundError,
        training.CheckpointError, data.MissingDataError: as `bmojo_jax.load`, `data.load_data`.
    """
    model, tokenizer, config, step = bmojo_jax.load(workdir)
    if config.data.name in data_lib.SYNTHETIC_TASKS:
        raise ValueError(f"--workdir={workdir}: trained on the synthetic task "
                         f"{config.data.name!r}; the long-context suite needs a text corpus.")
    return Model(str(workdir), model, tokenizer, config, int(step),
                 data_lib.load_data(config).corpus)


def memory_fields(config: bmojo_jax.ModelConfig) -> dict:
    """The fields of a `ModelConfig` that say which memories a model has (`has_memory`), as its
    record of `evaluate_model` carries them."""
    return dict(layer_mixers=config.layer_mixers, eidetic_slots=config.eidetic_slots,
                storage_slots=config.storage_slots)


def has_memory(fields: Mapping, memory: str) -> bool:
    """Whether a model reads the memory (a key of `MEMORY_OFF`): eidetic slots or a store in its
    `B` layers. `fields`: its `memory_fields`, or its record of `evaluate_model`, which carries
    them (records written before the store have no "storage_slots": no store)."""
    slots = fields.get("eidetic_slots" if memory == "eidetic" else "storage_slots", 0)
    return "B" in fields["layer_mixers"] and slots > 0


def memory_off(m: Model, memory: str) -> Model:
    """The model with one memory (a key of `MEMORY_OFF`) turned off at inference, the trained
    weights unchanged (`training.with_overrides`), named "<name>, <memory> memory off": what
    that memory contributes is the difference between the two records. Our choice, the suite's
    ablation: the model was trained with the memory and its other memories were not trained to
    do without it, so this measures what the trained model reads from it, not what a model
    trained without it would do."""
    return m._replace(name=f"{m.name}, {memory} memory off",
                      model=training.with_overrides(m.model, MEMORY_OFF[memory]))


def oracle_keeps(config) -> dict:
    """The `ModelConfig` overrides under which the oracle of `diagnostics.retrieval_selection`
    reads the slots: score eviction (fifo would drop the needle two chunks later, whatever its
    score) and as many selections per chunk as slots (at most the window), so that a needle
    inside one chunk is not cut to `eidetic_per_chunk` tokens. Our choice."""
    return dict(eidetic_eviction="score",
                eidetic_per_chunk=min(config.eidetic_slots, config.window))


def filler_stream(m: Model, filler: str) -> np.ndarray:
    """int32 [N]: the model's held-out test split ("test"), or every document of the Austen or
    Shakespeare corpus (sorted by name) in the model's tokenizer."""
    if filler == "test":
        return m.corpus.test
    documents = (data_lib.austen_documents() if filler == "austen"
                 else data_lib.shakespeare_documents())
    return np.concatenate([m.tokenizer.encode(documents[name]) for name in sorted(documents)])


def _batches(rows: np.ndarray, batch_size: int, pad_value: int):
    """Row blocks of `batch_size` rows, the last padded with rows of `pad_value` (one compiled
    shape per length)."""
    pad = -len(rows) % batch_size
    rows = np.concatenate([rows, np.full((pad, *rows.shape[1:]), pad_value, rows.dtype)])
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def retrieval(model, tokenizer, task: str, length: int, filler: np.ndarray, s: Settings) -> dict:
    """Greedy answers to the prompts of one task at one length, every depth of `s.depths`.

    Returns:
      {"accuracy": {depth: fraction of `s.examples` rows answered exactly}, "continuations" and
      "answers": {depth: [per row: the decoded continuation, the expected digits]}, "seconds"}
      (prefill + decoding, compilation included), and for a model with `B` layers "memory":
      {depth: {layer: its entry of `diagnostics.retrieval_diagnostics`}} (are the needle's
      answer tokens in the eidetic slots, or among the stored tokens retrieved, while the answer's
      digits are written; where those positions look) and, with eidetic slots, "selection":
      {depth: `diagnostics.retrieval_selection`} (teacher-forced digits with the model's own
      selection, with the oracle's under `oracle_keeps`, and with no slots); or {"skipped":
      reason} when the prompts cannot be built (the length leaves no room for filler, or the
      tokenizer cannot write the prompt).
    """
    try:
        batches = [lc.passkey(tokenizer, filler, length, d, s.examples, seed=s.seed)
                   if task == "passkey" else
                   lc.multikey_needle(tokenizer, filler, length, d, s.examples, seed=s.seed,
                                      num_needles=s.num_needles) for d in s.depths]
    except ValueError as error:
        return {"skipped": str(error)}
    inputs = np.concatenate([b.inputs for b in batches])
    answers = [a for b in batches for a in b.answers]
    tic = time.perf_counter()
    generated = np.concatenate([  # room for any tokenization of the digits, one program
        bmojo_jax.generate(model, rows, lc.ANSWER_TOKENS, temperature=0)
        for rows in _batches(inputs, s.batch_size, 0)])[:len(inputs)]
    seconds = time.perf_counter() - tic
    texts = [tokenizer.decode(g) for g in generated]
    correct = [lc.answer_correct(t, a) for t, a in zip(texts, answers)]
    n = s.examples
    cell = {"accuracy": {str(d): float(np.mean(correct[i * n:(i + 1) * n]))
                         for i, d in enumerate(s.depths)},
            "continuations": {str(d): texts[i * n:(i + 1) * n] for i, d in enumerate(s.depths)},
            "answers": {str(d): answers[i * n:(i + 1) * n] for i, d in enumerate(s.depths)},
            "seconds": seconds}
    if "B" in model.config.layer_mixers:
        cell["memory"] = {str(d): {str(layer): v for layer, v in diagnostics.retrieval_diagnostics(
            model, tokenizer, b, batch_size=s.batch_size).items()}
            for d, b in zip(s.depths, batches)}
    if "B" in model.config.layer_mixers and model.config.eidetic_slots:
        kept = training.with_overrides(model, oracle_keeps(model.config))
        cell["selection"] = {str(d): diagnostics.retrieval_selection(
            model, tokenizer, b, oracle_model=kept, batch_size=s.batch_size)
            for d, b in zip(s.depths, batches)}
    return cell


def copy_test(model, corpus, lengths: Sequence[int], s: Settings) -> dict:
    """The copy test at every context length (`lc.copy_test_rows`: `s.examples` rows of tokens
    drawn uniformly from the distinct tokens of the training split, so every token is one the
    model embeds), through the library's evaluation step.

    Returns:
      {length: {"accuracy": argmax accuracy on the second copy's predictable tokens, "loss": their
      mean NLL (nats/token; a model that does not copy pays about ln of the vocabulary),
      "seconds"}}.
    """
    vocabulary = np.unique(corpus.train)
    eval_step = training.make_eval_step(model.config)
    params = nnx.state(model, nnx.Param)
    out = {}
    for length in lengths:
        inputs, targets = lc.copy_test_rows(vocabulary, length, s.examples, seed=s.seed)
        batches = list(zip(_batches(inputs, s.batch_size, 0),
                           _batches(targets, s.batch_size, data_lib.IGNORE_INDEX)))
        tic = time.perf_counter()
        result = training.evaluate(eval_step, params, batches, with_accuracy=True)
        out[str(length)] = dict(accuracy=result["accuracy"], loss=result["loss"],
                                seconds=time.perf_counter() - tic)
        print(f"[{NAME}] copy at {length} tokens: accuracy {result['accuracy']:.2f}", flush=True)
    return out


def perplexity(model, corpus, lengths: Sequence[int], score_tokens: int, s: Settings) -> dict:
    """Test perplexity at every context length on the same scored tokens (`lc.scoring_ends`,
    `lc.scored_windows`), through the library's evaluation step.

    Returns:
      {"windows", "scored_tokens", "documents": token counts of the documents used, "by_length":
      {length: {"loss" (nats/token), "perplexity", "tokens", "seconds"}}}.
    """
    starts = corpus.doc_starts["test"]
    ends = lc.scoring_ends(starts, len(corpus.test), max(lengths), score_tokens, s.windows)
    stops = np.append(starts[1:], len(corpus.test))
    used = sorted({int(np.searchsorted(starts, e, side="right") - 1) for e in ends})
    eval_step = training.make_eval_step(model.config)
    params = nnx.state(model, nnx.Param)
    out = {}
    for length in lengths:
        inputs, targets = lc.scored_windows(corpus.test, ends, length, score_tokens)
        batches = list(zip(_batches(inputs, s.batch_size, 0),
                           _batches(targets, s.batch_size, data_lib.IGNORE_INDEX)))
        tic = time.perf_counter()
        result = training.evaluate(eval_step, params, batches)
        out[str(length)] = dict(result, seconds=time.perf_counter() - tic)
        print(f"[{NAME}] perplexity at {length} tokens: {result['perplexity']:.2f}", flush=True)
    return dict(windows=len(ends), scored_tokens=len(ends) * score_tokens,
                documents=[int(stops[d] - starts[d]) for d in used], by_length=out)


def speed(model, lengths: Sequence[int]) -> dict:
    """Streaming inference of one sequence at every context length L: the prefill of L tokens
    into a fresh cache with room for L + `SPEED_DECODE_STEPS` (`decoding.compile_prefill`), and
    `SPEED_DECODE_STEPS` greedy decode steps from that cache (`decoding.compile_decode`), every
    length's two programs compiled and run once first, then timed in `SPEED_ROUNDS` rounds
    interleaved across the lengths, so that a machine's changing load does not pass for a
    length's cost: the prefills in rounds of their own, then the decodes in theirs
    (`harness.interleave_apart`). Our choice, because a decode timed right after a long prefill
    pays for the prefill's freed memory ([L, vocab] logits: 0.5 GiB at 32k tokens): the suite
    once reported the B'MOJO decode falling from 3,136 tokens/s at 256 tokens to 180 at 32,768,
    on a state of constant size. The prompt is token 0 repeated: the cost does
    not depend on the tokens.

    Returns:
      {length: {"prefill_tokens_per_s", "decode_tokens_per_s": medians over the rounds (tokens
      per second), "prefill_seconds", "decode_seconds": [seconds of each round]}}.
    """
    runners = {}
    for length in lengths:
        prompt = np.zeros((1, length), np.int32)
        runners["prefill", length], (logits, cache) = decoding.compile_prefill(
            model, prompt, length + SPEED_DECODE_STEPS)
        runners["decode", length] = decoding.compile_decode(
            model, logits[:, -1].argmax(-1).astype(np.int32), cache, SPEED_DECODE_STEPS)
        del logits  # [1, L, vocab]: not kept while the others are timed
    seconds = harness.interleave_apart(runners, SPEED_ROUNDS, group=lambda key: key[0]).seconds
    out = {}
    for length in lengths:
        prefill, decode = seconds["prefill", length], seconds["decode", length]
        out[str(length)] = dict(
            prefill_tokens_per_s=length / harness.spread(prefill).median,
            decode_tokens_per_s=SPEED_DECODE_STEPS / harness.spread(decode).median,
            prefill_seconds=prefill, decode_seconds=decode)
        print(f"[{NAME}] speed at {length} tokens: prefill "
              f"{out[str(length)]['prefill_tokens_per_s']:,.0f} tokens/s, decode "
              f"{out[str(length)]['decode_tokens_per_s']:,.1f} tokens/s", flush=True)
    return out


def evaluate_model(m: Model, s: Settings) -> dict:
    """Every task of `s` on one model (see the module docstring): its JSON record."""
    model, config, corpus = m.model, m.config, m.corpus
    t = int(config.data.seq_len)
    lengths = list(s.lengths or [t * 2 ** i for i in range(8)])
    score_tokens = s.score_tokens or max(1, t // 2)
    if score_tokens > min(lengths):
        raise ValueError(f"--score_tokens={score_tokens}: must be at most the shortest length "
                         f"{min(lengths)} (default: half the training context {t}).")
    record = dict(name=m.name, preset=config.model_preset,
                  **memory_fields(model.config), window=model.config.window,
                  params=bmojo_jax.count_params(model),
                  step=m.step, train_seq_len=t, batch_size=int(config.batch_size),
                  lr=float(config.optimizer.lr), config=config.to_dict(), corpus=config.data.name,
                  vocab_size=model.config.vocab_size, lengths=lengths, score_tokens=score_tokens,
                  state_bytes={str(n): decoding.state_bytes(model.config, 1, n)
                               for n in lengths})
    retrieval_tasks = [task for task in s.tasks if task in RETRIEVAL]
    filler = filler_stream(m, s.filler) if retrieval_tasks else None
    for task in retrieval_tasks:
        record[task] = {}
        for length in lengths:
            cell = retrieval(model, m.tokenizer, task, length, filler, s)
            record[task][str(length)] = cell
            summary = (f"skipped: {cell['skipped']}" if "skipped" in cell else
                       f"accuracy {np.mean(list(cell['accuracy'].values())):.2f}")
            print(f"[{NAME}] {m.name} {task} at {length} tokens: {summary}", flush=True)
    if "copy" in s.tasks:
        record["copy"] = copy_test(model, corpus, lengths, s)
    if "perplexity" in s.tasks:
        record["perplexity"] = perplexity(model, corpus, lengths, score_tokens, s)
    if "speed" in s.tasks:
        record["speed"] = speed(model, lengths)
    return record


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _accuracy_grid(record: dict, task: str, depths) -> np.ndarray:
    """float [lengths, depths] accuracy in [0, 1], NaN where a length was skipped."""
    return np.array([[record[task][str(n)]["accuracy"][str(d)]
                      if "accuracy" in record[task][str(n)] else np.nan for d in depths]
                     for n in record["lengths"]])


def _memories(m: dict) -> str:
    """The memory sizes a model's layers use, as the report writes them after the layers, e.g.
    ", window 64, 16 eidetic slots" ("" for a full-attention or SSM-only model)."""
    layers = set(m["layer_mixers"])
    words = [f"window {m['window']}"] if layers & set("WFB") else []
    if "B" in layers:
        words.append(f"{m['eidetic_slots']} eidetic slots")
        if m.get("storage_slots"):  # records written before the store have none
            words.append(f"a store of {m['storage_slots']:,} tokens")
    return "".join(", " + w for w in words)


def _by_length(m: dict, title: str, columns: Sequence[str], cells) -> list:
    """`title` (a paragraph), then a markdown table of one model with a row per context length n:
    "| n | n / T |" and then `cells(n)` (strings) under `columns`; a blank line after it."""
    t = m["train_seq_len"]
    return [title + "\n", "| length | x T | " + " | ".join(columns) + " |",
            "|---:|---:|" + "---:|" * len(columns),
            *(f"| {n:,} | {n / t:g} | " + " | ".join(cells(n)) + " |" for n in m["lengths"]), ""]


def _memory_table(m: dict, task: str, depths) -> list:
    """The lines of the table of where the needle's answer tokens are while the answer is written
    (the cells' "memory": `diagnostics.retrieval_diagnostics`), per layer; [] for a model without
    traced memory (no `B` layer, or its slots and store off)."""
    memory = {n: m[task][str(n)].get("memory", {}) for n in m["lengths"]}
    layers = sorted({layer for cell in memory.values() for by_layer in cell.values()
                     for layer in by_layer}, key=int)
    if not layers:
        return []
    kinds = [(key, label) for key, label in (("selection_recall", "slots"),
                                             ("storage_recall", "store"))
             if any(key in memory[n][str(d)][layer] for n in memory if memory[n]
                    for d in depths for layer in layers)]

    def cell(n, d):
        by_layer = memory[n].get(str(d))
        if not by_layer:
            return "—"
        if all(by_layer[layer]["reachable"] == 0 for layer in layers):
            return "recent"  # inside the window or not yet selectable: no memory can hold it
        return " · ".join(f"{label} " + " / ".join(f"{100 * by_layer[layer][key]:.0f}"
                                                   for layer in layers) for key, label in kinds)

    def eidetic_attention(n):
        per_layer = [[memory[n][str(d)][layer]["attention_mass"]["eidetic"] for d in depths
                      if "attention_mass" in memory[n].get(str(d), {}).get(layer, {})]
                     for layer in layers]
        return " / ".join(f"{100 * np.mean(v):.0f}" if v else "—" for v in per_layer)

    return _by_length(
        m, f"*Where the needle's answer tokens are while the answer is written* "
           f"(`retrieval_diagnostics`), layer {' / '.join(layers)}: the % of them in the eidetic "
           + ("slots (slots) and among the stored tokens retrieved (store) " if len(kinds) > 1
              else "slots ") + "visible to the positions that write the answer's digits "
           "(\"recent\": the needle is too recent for any memory, inside the window or not yet "
           "selectable), and the % of those positions' attention on eidetic keys (slots and "
           "retrieved stored tokens; the mean over depths; the rest is on the window and the "
           "fading keys).", [f"depth {d:g}" for d in depths] + ["eidetic attention"],
        lambda n: [cell(n, d) for d in depths] + [eidetic_attention(n)])


def _selection_table(m: dict, task: str, depths) -> list:
    """The lines of the table of selection against use (the cells' "selection":
    `diagnostics.retrieval_selection`); [] for a model without eidetic slots."""
    selection = {n: m[task][str(n)].get("selection") for n in m["lengths"]}
    if not any(selection.values()):
        return []

    def cell(n, d):
        if not selection[n]:
            return "—"
        r = selection[n][str(d)]
        held = min(r["oracle_recall"].values(), default=float("nan"))
        return (f"{100 * r['own']:.0f} / {100 * r['oracle']:.0f} ({100 * held:.0f}) / "
                f"{100 * r['no_slots']:.0f}")

    return _by_length(
        m, "*Selection against use* (`retrieval_selection`): the % of the answers' digit tokens "
           "right, teacher-forced, with the model's own selection / with the oracle's (the "
           "needle's answer tokens and nothing else, kept by score eviction; in brackets the % of "
           "them its slots hold, the least over layers) / with no eidetic slot.",
        [f"depth {d:g}" for d in depths], lambda n: [cell(n, d) for d in depths])


def markdown(record: dict) -> str:
    """The tables of every model and the method, from the record."""
    s = record["settings"]
    depths = s["depths"]
    lines = [f"# Long-context evaluation: passkey, multi-key needle, perplexity against context "
             f"length\n", *harness.provenance_lines(record),
             f"Wall time {record['wall_seconds'] / 60:.1f} min; raw numbers and every continuation "
             f"the models wrote: `{NAME}.json`\n"]
    for m in record["models"]:
        t = m["train_seq_len"]
        lines += [f"## {m['name']}\n",
                  f"Preset `{m['preset']}` (layers `{m['layer_mixers']}`{_memories(m)}), "
                  f"{m['params']:,} parameters, trained on "
                  f"`{m['corpus']}` (vocabulary {m['vocab_size']:,}) at context T = {t} tokens: "
                  f"{m['step']:,} steps of {m['batch_size']} x {t} tokens, peak learning rate "
                  f"{m['lr']:g} (its training config: the JSON).\n"]
        for task, title in RETRIEVAL.items():
            if task not in m:
                continue
            grid = dict(zip(m["lengths"], _accuracy_grid(m, task, depths)))
            lines += _by_length(
                m, f"**{title[0].upper() + title[1:]}**: accuracy (%) of {s['examples']} prompts "
                   f"per cell, by context length (tokens) and depth of the asked needle.",
                [f"depth {d:g}" for d in depths] + ["mean"], lambda n: [
                    *("—" if np.isnan(a) else f"{100 * a:.0f}" for a in grid[n]),
                    "—" if np.isnan(grid[n]).all() else f"{100 * np.nanmean(grid[n]):.0f}"])
            lines += _memory_table(m, task, depths) + _selection_table(m, task, depths)
            reasons = sorted({c["skipped"] for c in m[task].values() if "skipped" in c})
            lines += [f"— not run: {r}" for r in reasons] + ([""] if reasons else [])
        if "copy" in m:
            copied = m["copy"]
            lines += _by_length(
                m, f"**Copy**: the second copy of {s['examples']} spans of L / 2 + 1 random "
                   f"tokens, each written twice (accuracy: the argmax is the copied token; a "
                   f"model that does not copy scores about 0% and ln {m['vocab_size']:,} = "
                   f"{np.log(m['vocab_size']):.2f} nats).",
                ["copy distance (tokens)", "accuracy (%)", "loss (nats/token)"], lambda n: [
                    f"{n // 2 + 1:,}", f"{100 * copied[str(n)]['accuracy']:.0f}",
                    f"{copied[str(n)]['loss']:.2f}"])
        if "perplexity" in m:
            p = m["perplexity"]
            documents = ", ".join(f"{d:,}" for d in p["documents"])
            lines += _by_length(
                m, f"**Perplexity** on the same {p['scored_tokens']:,} test tokens at every "
                   f"length: the last {m['score_tokens']} targets of each of {p['windows']} "
                   f"windows, from the longest held-out documents ({documents} tokens).",
                ["perplexity", "loss (nats/token)"], lambda n: [
                    f"{p['by_length'][str(n)]['perplexity']:.2f}",
                    f"{p['by_length'][str(n)]['loss']:.4f}"])
        if "speed" in m:
            v = m["speed"]
            lines += _by_length(
                m, f"**Streaming inference**, one sequence: the decoding state at that length, "
                   f"and tokens/s (median of {SPEED_ROUNDS} rounds interleaved across the lengths; "
                   f"every round in the JSON) of "
                   f"the prefill of L tokens and of {SPEED_DECODE_STEPS} decode steps after it.",
                ["state (MiB)", "prefill tokens/s", "decode tokens/s"], lambda n: [
                    f"{m['state_bytes'][str(n)] / 2 ** 20:.2f}",
                    f"{v[str(n)]['prefill_tokens_per_s']:,.0f}",
                    f"{v[str(n)]['decode_tokens_per_s']:,.1f}"])
    lines += [
        "## Method\n",
        f"Prompts (`bmojo_jax.data.long_context`; seed {s['seed']}): prefix, filler, needle(s), "
        f"filler, question, each tokenized separately and concatenated to exactly the stated "
        f"length. The filler is a contiguous run of real text: "
        + ("the held-out test split of the model's corpus" if s["filler"] == "test" else
           f"every document of `{s['filler']}` (it may overlap the training text)")
        + ", from a random offset. Passkey: Mohtashami and Jaggi's prompt with a random 5-digit "
        f"key. Needle: RULER's multi-key template, {s['num_needles']} needles (word key, 7-digit "
        f"value), the asked one at the stated depth (the fraction of filler tokens before it), the "
        f"others at random depths. Prompt i has the same key(s) and relative filler offset at "
        f"every length and depth. Answers: greedy decoding with `bmojo_jax.generate` (parallel "
        f"prefill, then decode steps on the fixed-size state of every model but full attention, "
        f"whose KV cache grows with the length); a prompt counts as answered when the "
        f"continuation starts with the key's digits (what follows is not judged). Copy "
        f"(`copy_test_rows`): "
        f"tokens drawn uniformly from the distinct tokens of the training split, scored in one "
        f"parallel forward pass (teacher-forced), only the second copy's tokens after its first. "
        f"Perplexity: windows of L tokens "
        f"ending at the same positions for every L, inside one document, each run from an empty "
        f"state; only the last tokens of each window are scored, so every length is scored on "
        f"the same tokens and differences come from the context alone. RoPE positions continue "
        f"past the training context (no interpolation). The seconds of each task in the JSON "
        f"include compilation; the tokens/s do not, and carry the noise of a machine that may be "
        f"shared with training runs (about 10-20%).",
        "", f"![{NAME}]({NAME}.png)", ""]
    return "\n".join(lines)


def plot(record: dict, path) -> None:
    """Per model, an accuracy heatmap (length x depth) for each retrieval task; copy accuracy and
    perplexity against length, every model on one axis each."""
    plt = plotting.pyplot()
    models, depths = record["models"], record["settings"]["depths"]
    tasks = [task for task in RETRIEVAL if any(task in m for m in models)]
    curves = [(key, label) for key, label in (
        ("copy", "copy accuracy (%), from L / 2 + 1 tokens back"),
        ("perplexity", "test perplexity of the same scored tokens")) if any(key in m for m in models)]
    columns = len(tasks) + len(curves)
    fig = plt.figure(figsize=(4.6 * columns, 0.4 + 3.4 * len(models)))
    grid = fig.add_gridspec(len(models), columns)
    for row, m in enumerate(models):
        for col, task in enumerate(tasks):
            ax = fig.add_subplot(grid[row, col])
            if task not in m:
                ax.axis("off")
                continue
            acc = 100 * _accuracy_grid(m, task, depths)
            image = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="viridis",
                              aspect="auto")
            for (i, j), a in np.ndenumerate(acc):
                ax.text(j, i, "not run" if np.isnan(a) else f"{a:.0f}", ha="center",
                        va="center", color="white" if a < 60 else "black", fontsize=8)
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_yticks(range(len(m["lengths"])), [f"{n:,}" for n in m["lengths"]])
            ax.set_xlabel("depth of the asked needle (fraction of the filler)")
            ax.set_ylabel("context length (tokens)")
            ax.set_title(f"{Path(m['name']).name}: {task} accuracy (%)", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
    for col, (key, label) in enumerate(curves, start=len(tasks)):
        ax = fig.add_subplot(grid[:, col])
        for m in models:
            if key in m:
                values = ([100 * m["copy"][str(n)]["accuracy"] for n in m["lengths"]]
                          if key == "copy" else
                          [m["perplexity"]["by_length"][str(n)]["perplexity"] for n in m["lengths"]])
                ax.plot(m["lengths"], values, marker="o",
                        label=f"{Path(m['name']).name} (T = {m['train_seq_len']})")
                ax.axvline(m["train_seq_len"], color="gray", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens); dashed: training context T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    plotting.save(fig, path)


def _record_path(cache: Path, name: str) -> Path:
    """CACHE/<name, "/" as "+">.json: "workdir/a/b, eidetic memory off" ->
    "workdir+a+b_eidetic_memory_off.json"."""
    return cache / (re.sub(r"[^A-Za-z0-9._+-]+", "_", str(name).strip("/").replace("/", "+"))
                    + ".json")


def _kept(path: Path, key: dict) -> Optional[dict]:
    """The kept record file at `path` (settings, step, config, format, record) when every entry
    of `key` is the same in it; None when there is no such file or one differs."""
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept if {name: kept.get(name) for name in key} == key else None


def _settings_key(settings: Settings) -> dict:
    return json.loads(json.dumps(dict(settings=dataclasses.asdict(settings),
                                      format=RECORD_FORMAT)))


def evaluate_cached(m: Model, settings: Settings, cache: Optional[Path]) -> dict:
    """`evaluate_model`, keeping its record in CACHE/<workdir, "/" as "+">.json (None: no cache)
    with the settings, training config, checkpoint step and `RECORD_FORMAT` it was made with, and
    returning a kept record instead when all four are unchanged (our choice: a model trained
    again in the same workdir, a changed checkpoint or setting, or a record of an older format is
    evaluated again and its file replaced)."""
    if cache is None:
        return evaluate_model(m, settings)
    path = _record_path(cache, m.name)
    key = {**_settings_key(settings),
           **json.loads(json.dumps(dict(step=m.step, config=m.config.to_dict())))}
    kept = _kept(path, key)
    if kept is not None:
        print(f"{m.name}: the record of step {m.step} with these settings is in {path}; "
              f"reused", flush=True)
        return kept["record"]
    record = evaluate_model(m, settings)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(dict(**key, record=record), indent=1) + "\n")
    partial.replace(path)  # atomic: a stop mid-write leaves the old file or none
    return record


def records_of_absent_workdir(workdir, settings: Settings, cache: Optional[Path],
                              memories_off: Sequence[str] = ()) -> Optional[list]:
    """The kept records (`evaluate_cached`) of a workdir that is not on this machine (trained on
    another one, or deleted since): its own record, made with these settings and this
    `RECORD_FORMAT`, and, for each memory of `memories_off` it has, its record with that memory
    turned off, made from the same checkpoint step and training config. None (the workdir is
    then loaded, and its absence is the loader's error) when the workdir exists, there is no
    cache, or one of those records is missing or was made otherwise. Our choice: the tables of
    committed checkpoints regenerate, and gain a model, on a machine that holds only their
    records; the report names each record's step."""
    if cache is None or Path(workdir).exists():
        return None
    own_path = _record_path(cache, workdir)
    own = _kept(own_path, _settings_key(settings))
    if own is None or own["record"]["name"] != str(workdir):
        return None
    same = dict(_settings_key(settings), step=own["step"], config=own["config"])
    offs = [_kept(_record_path(cache, f"{workdir}, {memory} memory off"), same)
            for memory in memories_off if has_memory(own["record"], memory)]
    if None in offs:
        return None
    print(f"{workdir}: no such directory; its records of step {own['step']} with these "
          f"settings are in {cache}; reused", flush=True)
    return [own["record"], *(off["record"] for off in offs)]


def run(settings: Settings, models: Sequence, out_dir=None, command: Optional[str] = None,
        memories_off: Sequence[str] = ()) -> dict:
    """Evaluates every model and writes OUT/long_context.{md,json,png}. With an explicit
    `out_dir`, each model's record is also kept in OUT/long_context_models/ as it finishes, and a
    rerun with the same settings reuses the record of a model whose checkpoint step is unchanged
    (`evaluate_cached`), so a long run resumes where it stopped, and the record of a workdir
    that is not on this machine (`records_of_absent_workdir`).

    Args:
      settings: a `Settings`.
      models: each a training workdir of a model trained on a text corpus (read with `load`, one
        at a time; or its kept record, where the workdir is not here) or a `Model`.
      out_dir: where the files go (created); None: a new runs/long_context-<timestamp>/.
      command: the command line to record (None: this process's `python -m
        experiments.long_context` command).
      memories_off: keys of `MEMORY_OFF`: each model that has such a memory is evaluated again
        with it turned off at inference (`memory_off`), right after itself.

    Returns:
      The JSON object written.

    Raises:
      ValueError: bad settings or memories_off, a workdir not trained on text;
        FileNotFoundError, training.CheckpointError: unreadable workdirs.
    """
    check_settings(settings)
    if not models:
        raise ValueError("--workdir: give at least one training workdir.")
    unknown = sorted(set(memories_off) - set(MEMORY_OFF))
    if unknown:
        raise ValueError(f"--memory_off={','.join(memories_off)}: {', '.join(unknown)} not "
                         f"allowed; allowed values are {', '.join(MEMORY_OFF)}.")
    meta = harness.provenance(command or harness.command_line(f"experiments.{NAME}"))
    tic = time.perf_counter()
    cache = Path(out_dir) / f"{NAME}_models" if out_dir else None
    records = []
    for m in models:
        kept = None if isinstance(m, Model) else records_of_absent_workdir(
            m, settings, cache, memories_off)
        if kept is not None:
            records += kept
            continue
        m = m if isinstance(m, Model) else load(m)
        records.append(evaluate_cached(m, settings, cache))
        records += [evaluate_cached(memory_off(m, memory), settings, cache)
                    for memory in memories_off
                    if has_memory(memory_fields(m.model.config), memory)]
    record = dict(**meta, settings=dataclasses.asdict(settings), models=records,
                  wall_seconds=time.perf_counter() - tic)
    prefix = harness.output_prefix(NAME, out_dir=out_dir)  # created once there is a result
    plot(record, f"{prefix}.png")
    harness.write_report(prefix, record, markdown(record))
    return record


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (the tests
    import it beside other modules with flags of the same names)."""
    flags.DEFINE_list("workdir", None, "Training workdirs (comma-separated) of models "
        "trained on a text corpus.")
    flags.DEFINE_list("lengths", None, "Context lengths in tokens (default: T x 1, 2, 4, "
        "..., 128 for the training context T: 32,768 tokens at T = 256).")
    flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths in [0, 1] "
        "(the fraction of the filler before the asked needle).")
    flags.DEFINE_integer("examples", 8, "Prompts per (length, depth) cell.")
    flags.DEFINE_list("tasks", list(TASKS), f"Tasks: {', '.join(TASKS)}.")
    flags.DEFINE_integer("num_needles", 4, "Needles per multi-key prompt.")
    flags.DEFINE_enum("filler", "test", FILLERS, "Filler text: the model's held-out test "
        "split, or all of Austen's or Shakespeare's text.")
    flags.DEFINE_integer("score_tokens", None, "Targets scored at the end of each "
        "perplexity window (default: half the training context).")
    flags.DEFINE_integer("windows", 16, "Perplexity windows.")
    flags.DEFINE_integer("batch_size", 4, "Sequences per compiled call.")
    flags.DEFINE_integer("seed", 0, "Seed of the prompts.")
    flags.DEFINE_list("memory_off", [], f"Memories ({', '.join(MEMORY_OFF)}) to turn off at "
        "inference: each model that has one is evaluated again without it.")
    flags.DEFINE_string("out_dir", None, harness.OUT_DIR_HELP)
    flags.mark_flag_as_required("workdir")


def _numbers(flag: str, values: Sequence[str], kind):
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        sys.exit(f"error: --{flag}={','.join(values)}: each value must be "
                 f"{'an integer' if kind is int else 'a number'}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file at INFO
    settings = Settings(
        lengths=_numbers("lengths", FLAGS.lengths, int) if FLAGS.lengths else None,
        depths=_numbers("depths", FLAGS.depths, float), examples=FLAGS.examples,
        tasks=tuple(FLAGS.tasks), num_needles=FLAGS.num_needles, filler=FLAGS.filler,
        score_tokens=FLAGS.score_tokens, windows=FLAGS.windows, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed)
    try:
        run(settings, FLAGS.workdir, FLAGS.out_dir, memories_off=FLAGS.memory_off)
    except (ValueError, FileNotFoundError, training.CheckpointError) as e:  # no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
