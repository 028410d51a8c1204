"""Long-context evaluation: the prompt and window generators of `bmojo_jax.data.long_context`
(needles at the stated depth and span, exact lengths, determinism by seed, the same scored tokens
at every length, clear errors), and one end-to-end run of `experiments.long_context` on a tiny
randomly initialised model."""

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from flax import nnx

import bmojo_jax
from bmojo_jax import data, training
from bmojo_jax.data import long_context as lc
from experiments import long_context as runner

TINY = Path(__file__).parent / "data" / "tiny_corpus"


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A directory of 6 documents, each the tiny corpus's texts rotated and repeated twice."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(TINY.glob("*.txt"))]
    root = tmp_path_factory.mktemp("documents")
    for i in range(len(texts)):
        (root / f"{i}.txt").write_text("".join(texts[i:] + texts[:i]) * 2, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(documents, tmp_path_factory):
    """The documents with a byte-level BPE of 300 tokens (the tokenizer cached in a tmp dir)."""
    return data.load_corpus("text_files", path=documents, vocab_size=300,
                            cache_dir=tmp_path_factory.mktemp("cache"))


def test_passkey_prompt_layout(corpus):
    """Exact length; the prefix, the needle (with the key, at the stated depth) and the question
    sit where stated; the answer is the key."""
    for length, depth in [(300, 0.0), (300, 1.0), (457, 0.3), (600, 0.5)]:
        batch = lc.passkey(corpus, corpus.train, length, depth, 3, seed=5)
        assert batch.inputs.shape == (3, length) and batch.inputs.dtype == np.int32
        assert batch.needle_spans.shape == (3, 1, 2) and batch.depth == depth
        prefix, question = (len(corpus.encode(s)) for s in (lc.PASSKEY_PREFIX,
                                                            lc.PASSKEY_QUESTION))
        for row, key, (start, stop), realized in zip(batch.inputs, batch.answers,
                                                     batch.needle_spans[:, 0],
                                                     batch.needle_depths[:, 0]):
            assert len(key) == 5 and key.isdigit()
            assert corpus.decode(row[start:stop]) == lc.PASSKEY_NEEDLE.format(key=key)
            assert corpus.decode(row[:prefix]) == lc.PASSKEY_PREFIX
            assert corpus.decode(row[-question:]) == lc.PASSKEY_QUESTION
            n_filler = length - prefix - question - (stop - start)
            assert start - prefix == np.floor(depth * n_filler + 0.5)
            assert realized == pytest.approx((start - prefix) / n_filler)
            assert abs(realized - depth) <= 0.5 / n_filler + 1e-12
        if depth == 0.0:
            assert (batch.needle_spans[:, 0, 0] == prefix).all()
        if depth == 1.0:
            assert (batch.needle_spans[:, 0, 1] == length - question).all()


def test_answered_rows_label_the_answer_after_its_prompt(corpus):
    """The prompt, then " " + the answer, padded to one shape; only the answer's digit tokens
    are labelled (the targets of the positions that predict them); the needle's runs of those
    tokens are marked (the passkey writes its key twice, the needle its value once)."""
    for batch, copies in ((lc.passkey(corpus, corpus.train, 480, 0.5, 3, seed=2), 2),
                          (lc.multikey_needle(corpus, corpus.train, 480, 0.5, 3, seed=2), 1)):
        inputs, targets, in_needle = lc.answered_rows(corpus, batch)
        assert inputs.shape == targets.shape == (3, 480 + lc.ANSWER_TOKENS - 1)
        np.testing.assert_array_equal(inputs[:, :480], batch.inputs)
        for row, answer in enumerate(batch.answers):
            ids = np.asarray(corpus.encode(" " + answer))
            digits = np.array([any(c.isdigit() for c in corpus.decode([j])) for j in ids])
            labelled = np.flatnonzero(targets[row] >= 0)
            np.testing.assert_array_equal(labelled, 479 + np.flatnonzero(digits))
            assert corpus.decode(targets[row, labelled]) == answer
            np.testing.assert_array_equal(inputs[row, 480:479 + len(ids)], ids[:-1])
            start, stop = batch.needle_spans[row, 0]
            held = np.flatnonzero(in_needle[row])
            assert start <= held.min() and held.max() < stop
            assert len(held) == copies * digits.sum()
            assert corpus.decode(inputs[row, held]) == answer * copies


def test_multikey_needles_are_distinct_and_the_asked_one_is_at_depth(corpus):
    batch = lc.multikey_needle(corpus, corpus.train, 700, 0.75, 4, seed=2, num_needles=3)
    assert batch.inputs.shape == (4, 700) and batch.needle_spans.shape == (4, 3, 2)
    prefix = len(corpus.encode(lc.NEEDLE_PREFIX))
    for row, answer, spans, depths in zip(batch.inputs, batch.answers, batch.needle_spans,
                                          batch.needle_depths):
        order = np.argsort(spans[:, 0])
        assert (spans[order][1:, 0] >= spans[order][:-1, 1]).all()  # no overlap
        texts = [corpus.decode(row[a:b]) for a, b in spans]
        keys = [t.split(" for ")[1].split(" is:")[0] for t in texts]
        values = [t.split(": ")[1].rstrip(".\n") for t in texts]
        assert texts == [lc.NEEDLE_TEXT.format(key=k, value=v) for k, v in zip(keys, values)]
        assert len(set(keys)) == 3 and len(set(values)) == 3 and set(keys) <= set(lc.NEEDLE_KEYS)
        assert answer == values[0] and len(answer) == 7
        question = lc.NEEDLE_QUESTION.format(key=keys[0])
        assert corpus.decode(row).endswith(question)
        n_filler = 700 - prefix - sum(b - a for a, b in spans) - len(corpus.encode(question))
        assert abs(depths[0] - 0.75) <= 0.5 / n_filler + 1e-12
        filler_before = spans[0, 0] - prefix - sum(b - a for a, b in spans if b <= spans[0, 0])
        assert filler_before == np.floor(0.75 * n_filler + 0.5)


def test_prompts_are_a_function_of_the_seed_and_paired_across_cells(corpus):
    a = lc.passkey(corpus, corpus.train, 400, 0.5, 4, seed=3)
    b = lc.passkey(corpus, corpus.train, 400, 0.5, 4, seed=3)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    assert a.answers == b.answers
    c = lc.passkey(corpus, corpus.train, 400, 0.5, 4, seed=4)
    assert c.answers != a.answers and not np.array_equal(c.inputs, a.inputs)
    assert len(set(a.answers)) > 1  # rows differ
    for length, depth in [(300, 0.5), (400, 0.0), (600, 1.0)]:  # same keys in every cell
        assert lc.passkey(corpus, corpus.train, length, depth, 4, seed=3).answers == a.answers
    n1 = lc.multikey_needle(corpus, corpus.train, 500, 0.2, 2, seed=1, num_needles=2)
    n2 = lc.multikey_needle(corpus, corpus.train, 700, 0.9, 2, seed=1, num_needles=2)
    assert n1.answers == n2.answers


def test_generator_errors_are_clear(corpus):
    with pytest.raises(ValueError, match="length=50 leaves no room for filler"):
        lc.passkey(corpus, corpus.train, 50, 0.5, 1)
    with pytest.raises(ValueError, match="the filler holds 10 tokens"):
        lc.passkey(corpus, corpus.train[:10], 400, 0.5, 1)
    with pytest.raises(ValueError, match=r"depth=1.5: must be a number in \[0, 1\]"):
        lc.passkey(corpus, corpus.train, 400, 1.5, 1)
    with pytest.raises(ValueError, match="num_examples=0"):
        lc.passkey(corpus, corpus.train, 400, 0.5, 0)
    with pytest.raises(ValueError, match="num_needles=99"):
        lc.multikey_needle(corpus, corpus.train, 400, 0.5, 1, num_needles=99)
    with pytest.raises(ValueError, match="filler must be a 1-D integer token stream"):
        lc.passkey(corpus, np.zeros((2, 5), np.int32), 400, 0.5, 1)
    words = data.WordTokenizer.from_text("the pass key is\n")  # PTB-like: no digits, no "?"
    with pytest.raises(ValueError, match="cannot write .* exactly .* lossless tokenizer"):
        lc.passkey(words, np.zeros(1000, np.int32), 400, 0.5, 1)


def test_retrieval_training_rows_end_with_the_answer_of_their_needle(corpus):
    """Every row is a passkey or needle prompt followed by " " + its answer, exactly t tokens
    (targets: the inputs shifted by one), both tasks drawn, a pure function of the seed; the
    answer's digits are written in the row's needle."""
    inputs, targets = lc.retrieval_training_rows(corpus, corpus.train, 600, 8, seed=3)
    assert inputs.shape == targets.shape == (8, 600) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    questions = set()
    for row_in, row_target in zip(inputs, targets):
        text = corpus.decode(np.append(row_in, row_target[-1]))
        for task, question in (("passkey", lc.PASSKEY_QUESTION), ("needle", "text is")):
            head, _, answer = text.rpartition(question + " ")
            if head and answer.isdigit():
                questions.add(task)
                needle = (lc.PASSKEY_NEEDLE.format(key=answer) if task == "passkey"
                          else f" is: {answer}.\n")
                assert needle in head, (task, answer)
                break
        else:
            raise AssertionError(f"row does not end with a question and its answer: {text!r}")
    assert questions == {"passkey", "needle"}
    again = lc.retrieval_training_rows(corpus, corpus.train, 600, 8, seed=3)
    np.testing.assert_array_equal(inputs, again[0])
    assert not np.array_equal(inputs, lc.retrieval_training_rows(corpus, corpus.train, 600, 8,
                                                                 seed=4)[0])
    answer_only = lc.retrieval_training_rows(corpus, corpus.train, 600, 8, seed=3,
                                             labels="answer")
    np.testing.assert_array_equal(answer_only[0], inputs)  # the same rows, fewer labels
    for row_target, row_answer in zip(targets, answer_only[1]):  # labelled: " " + the digits
        mask = row_answer != lc.IGNORE_INDEX
        n = int(mask.sum())
        assert mask[-n:].all() and 1 < n < 12
        np.testing.assert_array_equal(row_answer[mask], row_target[-n:])
        assert corpus.decode(row_answer[mask]).strip().isdigit()
    with pytest.raises(ValueError, match="labels='prompt': allowed values are all, answer"):
        lc.retrieval_training_rows(corpus, corpus.train, 600, 1, labels="prompt")


def test_copy_rows_write_passages_twice():
    """copy_training_rows: each row is random tokens of the filler's vocabulary made of units,
    a passage, other tokens and the passage again, at varying lengths and distances, some
    copies close and some far; every target labelled, or (labels="copy") only the copied
    tokens, which a perfect copier predicts; a pure function of the seed; clear errors. A filler
    of a million distinct tokens makes every token's earlier occurrence its copy's source (at
    seed 5 no two other tokens coincide)."""
    filler = np.arange(10 ** 6)
    inputs, targets = lc.copy_training_rows(filler, 63, 40, seed=5)
    assert inputs.shape == targets.shape == (40, 63) and inputs.dtype == np.int32
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    copy_inputs, copy_targets = lc.copy_training_rows(filler, 63, 40, seed=5, labels="copy")
    np.testing.assert_array_equal(copy_inputs, inputs)
    labelled = copy_targets != data.IGNORE_INDEX
    np.testing.assert_array_equal(copy_targets[labelled], targets[labelled])
    copier, distances = np.full_like(inputs, -1), []
    for i, row in enumerate(inputs):
        earlier = {token: j for j, token in reversed(list(enumerate(row)))}
        copier[i] = [row[earlier[token] + 1] if earlier[token] < j else -1
                     for j, token in enumerate(row)]
        distances += [j - earlier[row[j]] for j in np.flatnonzero(labelled[i])]
    assert data.accuracy(copier, copy_targets) == 1.0  # only copies are labelled ...
    assert np.all(copier[~labelled] != targets[~labelled])  # ... and every copy is
    assert labelled.any(axis=1).all() and 0.15 < labelled.mean() < 0.4
    assert min(distances) <= 4 and max(distances) >= 32  # log-uniform: every scale
    # max_distance=1: each passage repeated at once, so a copy is one passage length back (at
    # most (t + 1) // 4 = 16 tokens) and more of the targets are copies
    near = lc.copy_training_rows(filler, 63, 40, seed=5, labels="copy", max_distance=1)
    near_labelled = np.flatnonzero(near[1] != data.IGNORE_INDEX)
    rows, columns = np.divmod(near_labelled, 63)
    sources = np.array([np.flatnonzero(near[0][i] == near[0][i, j])[0]
                        for i, j in zip(rows, columns)])
    assert np.all(sources < columns) and max(columns - sources) <= 16
    assert len(near_labelled) > labelled.sum()
    with pytest.raises(ValueError, match="max_distance=0: must be an integer >= 1"):
        lc.copy_training_rows(filler, 63, 1, max_distance=0)
    with pytest.raises(ValueError, match="labels='answer': allowed values are all, copy"):
        lc.copy_training_rows(filler, 63, 1, labels="answer")
    tokens = np.array([5, 9, 5, 11, 9])  # the rows' tokens are the filler's distinct tokens
    assert set(np.unique(lc.copy_training_rows(tokens, 63, 4)[0])) == {5, 9, 11}
    np.testing.assert_array_equal(lc.copy_training_rows(filler, 63, 40, seed=5)[0], inputs)
    assert not np.array_equal(lc.copy_training_rows(filler, 63, 40, seed=6)[0], inputs)
    with pytest.raises(ValueError, match="length=6: copy rows need at least 7 tokens"):
        lc.copy_training_rows(filler, 6, 1)


def test_copy_test_rows_label_the_second_copy_only():
    """repeated_span: a span of the vocabulary's tokens, then the same span. copy_test_rows cuts
    such rows (span length // 2 + 1) to the context length and labels only the second copy after
    its first token, each target the token after the input's earlier occurrence, so a perfect
    copier scores 1."""
    vocabulary = np.array([3, 8, 13, 21, 40])
    rows = lc.repeated_span(vocabulary, 5, 3, seed=2)
    assert rows.shape == (3, 10) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[:, :5], rows[:, 5:])
    assert set(np.unique(rows)) <= set(vocabulary)
    np.testing.assert_array_equal(lc.repeated_span(vocabulary, 5, 3, seed=2), rows)
    for length in (8, 9):  # s = 5 both times: 2 s - 1 tokens kept, or all 2 s
        inputs, targets = lc.copy_test_rows(np.arange(10 ** 6), length, 3, seed=1)
        assert inputs.shape == targets.shape == (3, length)
        assert np.all(targets[:, :5] == data.IGNORE_INDEX)
        copier = inputs.copy()
        copier[:, 5:] = inputs[:, 1:length - 4]  # the token after the earlier occurrence
        np.testing.assert_array_equal(targets[:, 5:], copier[:, 5:])
        assert data.accuracy(copier, targets) == 1.0
        assert data.accuracy(inputs, targets) == 0.0  # distinct tokens: no copy, no credit
    with pytest.raises(ValueError, match="span=1: must be an integer >= 2"):
        lc.repeated_span(vocabulary, 1, 3)
    with pytest.raises(ValueError, match="vocabulary: must be a non-empty 1-D int array"):
        lc.repeated_span(np.zeros(0, np.int32), 4, 3)
    with pytest.raises(ValueError, match="length=2: must be an integer >= 3"):
        lc.copy_test_rows(vocabulary, 2, 3)


def test_text_data_mixes_retrieval_rows_into_training_batches(documents, tmp_path):
    """data.retrieval_fraction: the first round(fraction * b) rows of a training batch are
    retrieval rows, then data.copy_fraction's copy rows, the others the plain windows of
    lm_batch; with copy_only_steps, the batches before that step are copy rows only; a pure
    function of the step; settings that cannot work are refused before training."""
    common = dict(batch_size=4, seq_len=600, path=documents, bpe_vocab_size=300)
    plain = data.TextData("text_files", **common)
    mixed = data.TextData("text_files", retrieval_fraction=0.5, **common)
    for step in (0, 7):
        (x, y), (mx, my) = plain.train_batch(step), mixed.train_batch(step)
        np.testing.assert_array_equal(mx[2:], x[2:])
        np.testing.assert_array_equal(my[2:], y[2:])
        assert not np.array_equal(mx[:2], x[:2])
        np.testing.assert_array_equal(mixed.train_batch(step)[0], mx)
        assert any(question in mixed.corpus.decode(mx[0])
                   for question in ("What is the pass key?", "What is the special magic number"))
    copying = data.TextData("text_files", retrieval_fraction=0.5, copy_fraction=0.25, **common)
    cx, cy = copying.train_batch(7)
    np.testing.assert_array_equal(cx[:2], mx[:2])  # the retrieval rows first, unchanged
    np.testing.assert_array_equal(cx[3:], x[3:])  # then one copy row, then the plain window
    row = np.append(cx[2], cy[2, -1])
    span = max(2, len(row) // lc.COPY_SPAN_FRACTIONS[0])  # the shortest passage, twice
    grams = [tuple(row[j:j + span]) for j in range(len(row) - span + 1)]
    assert len(set(grams)) < len(grams) and not np.array_equal(cx[2], x[2])
    assert set(np.unique(cx[2])) <= set(np.unique(copying.corpus.train))
    curriculum = data.TextData("text_files", retrieval_fraction=0.5, copy_fraction=0.25,
                               copy_only_steps=7, **common)
    for step in (0, 6):  # copy rows only: every row holds a repeated passage of train tokens
        ox, oy = curriculum.train_batch(step)
        np.testing.assert_array_equal(ox[:, 1:], oy[:, :-1])
        for row in np.concatenate([ox, oy[:, -1:]], axis=1):
            grams = [tuple(row[j:j + span]) for j in range(len(row) - span + 1)]
            assert len(set(grams)) < len(grams)
        assert set(np.unique(ox)) <= set(np.unique(copying.corpus.train))
    for got, want in zip(curriculum.train_batch(7), (cx, cy)):  # then the mix, as without
        np.testing.assert_array_equal(got, want)
    halves = data.TextData("text_files", retrieval_fraction=0.3, copy_fraction=0.7,
                           **{**common, "batch_size": 5})  # round(1.5) + round(3.5) = 6 rows
    assert (halves.retrieval_rows, halves.copy_rows) == (2, 3)
    assert halves.train_batch(0)[0].shape == (5, 600)
    answer_only = data.TextData("text_files", retrieval_fraction=0.5, retrieval_labels="answer",
                                **common).train_batch(7)
    np.testing.assert_array_equal(answer_only[0], mixed.train_batch(7)[0])
    assert (answer_only[1][:2] == data.IGNORE_INDEX).mean() > 0.9  # the prompts' targets
    np.testing.assert_array_equal(answer_only[1][2:], y[2:])  # plain rows: every target
    with pytest.raises(ValueError, match=r"retrieval_fraction=1.5: must be a number in \[0, 1\]"):
        data.TextData("text_files", retrieval_fraction=1.5, **common)
    with pytest.raises(ValueError, match="retrieval_labels='prompt': allowed values are all"):
        data.TextData("text_files", retrieval_labels="prompt", **common)
    with pytest.raises(ValueError, match="retrieval_fraction=0.5 and copy_fraction=0.75: "
                                         "together at most 1"):
        data.TextData("text_files", retrieval_fraction=0.5, copy_fraction=0.75, **common)
    with pytest.raises(ValueError, match="copy_only_steps=-1: must be an integer >= 0"):
        data.TextData("text_files", copy_only_steps=-1, **common)
    with pytest.raises(ValueError, match="copy_max_distance=0.5: must be an integer >= 1"):
        data.TextData("text_files", copy_max_distance=0.5, **common)
    with pytest.raises(ValueError, match="retrieval_fraction=0.5, copy_fraction=0.0, "
                                         "copy_only_steps=0 on corpus "
                                         "'text_files' at seq_len=100: length=.* leaves no room "
                                         "for filler"):
        data.TextData("text_files", retrieval_fraction=0.5, **{**common, "seq_len": 100})


def test_held_out_retrieval_rows_are_scored_teacher_forced(documents):
    """A source that trains on retrieval rows evaluates `RETRIEVAL_EVAL_EXAMPLES` held-out rows of
    each split (the split's own text, only the answers labelled); `evaluate_held_out` counts
    answer tokens and whole answers, and `evaluate_split` adds both to its result."""
    common = dict(batch_size=4, seq_len=600, path=documents, bpe_vocab_size=300)
    mixed = data.TextData("text_files", retrieval_fraction=0.5, **common)
    assert data.TextData("text_files", **common).retrieval_batches("valid", 16) == []
    batches = mixed.retrieval_batches("valid", 16)
    inputs = np.concatenate([x for x, _ in batches])
    targets = np.concatenate([y for _, y in batches])
    assert inputs.shape == (data.RETRIEVAL_EVAL_EXAMPLES, 600) and len(batches[0][0]) == 16
    labelled = targets != data.IGNORE_INDEX
    assert labelled.any(axis=1).all() and labelled.mean() < 0.05  # the answers alone
    assert all(mixed.corpus.decode(row[m]).strip().isdigit() for row, m in zip(targets, labelled))
    filler = set(mixed.corpus.valid.tolist())
    assert len(set(inputs[0].tolist()) - filler) < len(set(inputs[0].tolist())) // 2
    assert not np.array_equal(mixed.retrieval_batches("test", 16)[0][0], batches[0][0])

    def eval_step(params, inputs, targets):  # wrong at the last answer token of a batch's row 0
        predictions = np.where(targets == data.IGNORE_INDEX, 0, targets)
        predictions[0, np.flatnonzero(targets[0] != data.IGNORE_INDEX)[-1]] += 1
        return {"predictions": predictions}
    scores = training.evaluate_held_out(eval_step, None, batches)
    assert scores["retrieval_exact"] == 1 - len(batches) / data.RETRIEVAL_EVAL_EXAMPLES
    wrong_rows = labelled[::16]  # row 0 of each batch: one of its answer tokens wrong
    assert scores["retrieval_accuracy"] == pytest.approx(
        1 - (1 / wrong_rows.sum(axis=1)).sum() / data.RETRIEVAL_EVAL_EXAMPLES)
    with pytest.raises(ValueError, match="a row has no labelled target"):
        training.evaluate_held_out(
            eval_step, None, [(inputs[:1], np.full_like(targets[:1], data.IGNORE_INDEX))])

    model_cfg = bmojo_jax.ModelConfig.preset("transformer", vocab_size=300, d_model=16,
                                             n_heads=2, n_layers=1, ssm_head_dim=8)
    params = nnx.state(bmojo_jax.LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    result = training.evaluate_split(training.make_eval_step(model_cfg), params, mixed, "valid",
                                     batch_size=16, seq_len=600, max_batches=1)
    assert 0 <= result["retrieval_exact"] <= result["retrieval_accuracy"] < 0.5  # untrained


@pytest.mark.slow
def test_copy_phase_ends_when_the_held_out_copy_is_learned(documents, tmp_path):
    """A run with data.copy_only_until: every validation scores held-out copy rows
    (copy_accuracy); the copy-only phase ends at the first validation that reaches the value
    (0: the first, step 2; a "curriculum" record says so), the batches after it are the mix, and
    early stopping counts only the validations after it (patience 1 with nothing improving: the
    stop comes at step 6, the second validation after the phase, not at 4)."""
    config = training.default_config("transformer")
    config.model.update(d_model=16, n_layers=1, n_heads=2, window=16, ssm_head_dim=8)
    config.data.update(name="text_files", path=str(documents), seq_len=32, bpe_vocab_size=300,
                       copy_fraction=0.25, copy_only_steps=6, copy_only_until=0.0)
    config.update(num_steps=10, batch_size=4, eval_every=2, eval_batches=1, checkpoint_every=10,
                  log_every=2)
    config.early_stop.update(metric="loss", patience=1, min_delta=10.0)
    config.sample.max_new_tokens = 0
    config.optimizer.warmup_steps = 2
    results = training.train_and_evaluate(config, tmp_path / "run")
    assert results["copy_phase_end"] == 2 and results["step"] == 6
    assert results["stop_reason"] == "patience" and "up to step 6" in _record(tmp_path, "stop")
    assert 0 <= results["valid"]["copy_accuracy"] <= 1 and "copy_exact" in results["test"]
    assert "copy_only_until 0: the copy-only phase ends" in _record(tmp_path, "curriculum")
    # Killed after the step-4 checkpoint (after the switch) and restarted: the phase's end comes
    # from the checkpoint's validation history, so the run ends as the uninterrupted one did.
    config.checkpoint_every = 4
    whole = training.train_and_evaluate(config, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    (tmp_path / "resumed" / "results.json").unlink()
    resumed = training.train_and_evaluate(config, tmp_path / "resumed")
    assert (resumed["step"], resumed["copy_phase_end"]) == (whole["step"], 2)
    assert resumed["valid"] == whole["valid"]
    source = data.load_data(config)
    mixed, copy_only = source.train_batch(3, copy_only=False), source.train_batch(3)
    assert not np.array_equal(mixed[0], copy_only[0])  # step 3 < copy_only_steps: copy rows
    np.testing.assert_array_equal(source.train_batch(3, copy_only=True)[0], copy_only[0])
    np.testing.assert_array_equal(source.train_batch(7, copy_only=False)[0],
                                  source.train_batch(7)[0])
    batches = source.copy_batches("valid", 16)
    assert [len(x) for x, _ in batches] == [16] * (data.RETRIEVAL_EVAL_EXAMPLES // 16)
    assert (np.concatenate([y for _, y in batches]) != data.IGNORE_INDEX).any(axis=1).all()
    assert data.TextData("text_files", batch_size=4, seq_len=32, path=documents,
                         bpe_vocab_size=300).copy_batches("valid", 16) == []


def _record(tmp_path, split):
    """The message of the run's one metrics record of `split`."""
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["split"] == split]
    return record["message"]


def test_copy_phase_end_is_the_first_validation_that_reaches_copy_only_until():
    """copy_phase_end: copy_only_steps without copy_only_until; with it, the step of the first
    validation before the cap whose copy_accuracy reaches it, else the cap."""
    history = [{"step": 2 * (i + 1), "copy_accuracy": a} for i, a in enumerate([0.1, 0.6, 0.9])]
    end = lambda **fields: training.copy_phase_end(ml_collections.ConfigDict(fields), history)
    assert end() == 0 and end(copy_only_steps=8) == 8
    assert end(copy_only_steps=8, copy_only_until=None) == 8
    assert end(copy_only_steps=8, copy_only_until=0.5) == 4
    assert end(copy_only_steps=8, copy_only_until=0.95) == 8  # never reached: the cap
    assert end(copy_only_steps=4, copy_only_until=0.5) == 4  # step 4 is not before the cap
    assert end(copy_only_steps=8, copy_only_until=0.0) == 2


def test_answer_correct():
    assert lc.answer_correct(" 71432. Remember", "71432")
    assert lc.answer_correct("71432", "71432")
    assert lc.answer_correct("\n71432<|endoftext|>", "71432")
    assert lc.answer_correct(" 714320", "71432")  # what follows the answer is not judged
    for wrong in (" 7143", " 7 1432", " the 71432", "", " 71433"):
        assert not lc.answer_correct(wrong, "71432")


def test_perplexity_windows_score_the_same_tokens_at_every_length():
    tokens = np.arange(1000, dtype=np.int32) + 7
    starts = np.array([0, 100, 700])  # documents of 100, 600 and 300 tokens
    ends = lc.scoring_ends(starts, 1000, 256, 64, num_windows=10)
    # longest document first ([100, 700): ends 356, 420, ... < 700), then [700, 1000)
    np.testing.assert_array_equal(ends, [356, 420, 484, 548, 612, 676, 956])
    scored = None
    for length in (64, 128, 256):
        inputs, targets = lc.scored_windows(tokens, ends, length, 64)
        assert inputs.shape == targets.shape == (7, length)
        assert (targets[:, :length - 64] == data.IGNORE_INDEX).all()
        np.testing.assert_array_equal(targets[:, :-1][targets[:, :-1] >= 0],
                                      inputs[:, 1:][targets[:, :-1] >= 0])  # next tokens
        np.testing.assert_array_equal(inputs[:, -1], tokens[ends - 1])
        if scored is None:
            scored = targets[:, -64:]
        np.testing.assert_array_equal(targets[:, -64:], scored)
    doc = np.searchsorted(starts, ends, side="right") - 1
    assert (ends - 256 >= starts[doc]).all()  # the longest window stays in its document
    np.testing.assert_array_equal(lc.scoring_ends(starts, 1000, 256, 64, 3), ends[:3])
    with pytest.raises(ValueError, match="no document holds max_length \\+ 1 = 601 tokens"):
        lc.scoring_ends(starts, 1000, 600, 64, 4)
    with pytest.raises(ValueError, match="score_tokens=65: must be an integer in \\[1, length"):
        lc.scored_windows(tokens, ends, 64, 65)
    with pytest.raises(ValueError, match="doc_starts must be"):
        lc.scoring_ends(np.array([5, 10]), 1000, 64, 8, 1)


def test_settings_errors_are_clear():
    with pytest.raises(ValueError, match="--tasks=passkey,summary: allowed values"):
        runner.check_settings(runner.Settings(tasks=("passkey", "summary")))
    with pytest.raises(ValueError, match=r"--depths=\(0.5, 2.0\): must be numbers in \[0, 1\]"):
        runner.check_settings(runner.Settings(depths=(0.5, 2.0)))
    with pytest.raises(ValueError, match="--lengths=\\(0,\\): must be positive integers"):
        runner.check_settings(runner.Settings(lengths=(0,)))
    with pytest.raises(ValueError, match="--examples=0: must be an integer >= 1"):
        runner.check_settings(runner.Settings(examples=0))


def test_runner_evaluates_each_model_again_with_a_memory_off(corpus, documents, tmp_path,
                                                             monkeypatch):
    """--memory_off: a model that has the memory is evaluated again right after itself, with it
    turned off at inference (the trained weights unchanged; its own record file); a model
    without it is not; an unknown memory is a clear error."""
    config = training.default_config("bmojo")
    config.data.update(name="text_files", path=str(documents), seq_len=32, bpe_vocab_size=300)
    shape = dict(vocab_size=corpus.vocab_size, d_model=16, n_layers=1, n_heads=2, window=16,
                 chunk_size=16, d_state=4, ssm_head_dim=8)
    bmojo = runner.Model("workdir/bmojo", bmojo_jax.LanguageModel(bmojo_jax.ModelConfig.preset(
        "bmojo", eidetic_per_chunk=2, eidetic_slots=4, **shape), rngs=nnx.Rngs(0)),
        corpus.tokenizer, config, 0, corpus)
    swa = bmojo._replace(name="workdir/swa", model=bmojo_jax.LanguageModel(
        bmojo_jax.ModelConfig.preset("swa", **shape), rngs=nnx.Rngs(0)))
    seen = []
    monkeypatch.setattr(runner, "evaluate_model", lambda m, s: seen.append(m) or dict(
        name=m.name))
    monkeypatch.setattr(runner, "plot", lambda record, path: None)
    monkeypatch.setattr(runner, "markdown", lambda record: "")
    record = runner.run(runner.Settings(), [bmojo, swa], out_dir=tmp_path, command="test",
                        memories_off=["eidetic", "storage"])
    assert [m["name"] for m in record["models"]] == [
        "workdir/bmojo", "workdir/bmojo, eidetic memory off", "workdir/swa"]
    assert sorted(p.name for p in (tmp_path / "long_context_models").iterdir()) == [
        "workdir+bmojo.json", "workdir+bmojo_eidetic_memory_off.json", "workdir+swa.json"]
    off = seen[1].model
    assert off.config.eidetic_slots == off.config.eidetic_per_chunk == 0
    assert bmojo.model.config.eidetic_slots == 4  # the model itself unchanged
    assert off.embed.embedding.get_value() is bmojo.model.embed.embedding.get_value()
    with pytest.raises(ValueError, match="--memory_off=eidetic,fading: fading not allowed; "
                                         "allowed values are eidetic, storage"):
        runner.run(runner.Settings(), [bmojo], memories_off=["eidetic", "fading"])


def test_runner_reuses_the_records_of_a_workdir_that_is_not_here(corpus, tmp_path, monkeypatch):
    """A workdir that is not on this machine is reported from its kept records (its own and its
    memory-off ones of the same step) when they were made with these settings; otherwise (other
    settings, or a memory-off record missing) it is loaded, and its absence is the loader's clear
    error."""
    config = training.default_config("bmojo")
    model = bmojo_jax.LanguageModel(bmojo_jax.ModelConfig.preset(
        "bmojo", vocab_size=corpus.vocab_size, d_model=16, n_layers=1, n_heads=2, window=16,
        chunk_size=16, d_state=4, ssm_head_dim=8, eidetic_per_chunk=2, eidetic_slots=4),
        rngs=nnx.Rngs(0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "evaluate_model", lambda m, s: dict(
        name=m.name, step=m.step, layer_mixers=m.model.config.layer_mixers,
        eidetic_slots=m.model.config.eidetic_slots, storage_slots=m.model.config.storage_slots))
    monkeypatch.setattr(runner, "plot", lambda record, path: None)
    monkeypatch.setattr(runner, "markdown", lambda record: "")
    trained = runner.Model("gone/bmojo", model, corpus.tokenizer, config, 7, corpus)
    runner.run(runner.Settings(), [trained], out_dir="out", command="test",
               memories_off=["eidetic"])
    runner.run(runner.Settings(), [trained._replace(name="gone/other", step=8)], out_dir="out",
               command="test", memories_off=["eidetic"])
    monkeypatch.setattr(runner, "evaluate_model", None)  # nothing is evaluated again
    record = runner.run(runner.Settings(), ["gone/bmojo", "gone/other"], out_dir="out",
                        command="test", memories_off=["eidetic"])
    assert [(m["name"], m["step"]) for m in record["models"]] == [
        ("gone/bmojo", 7), ("gone/bmojo, eidetic memory off", 7), ("gone/other", 8),
        ("gone/other, eidetic memory off", 8)]
    only_own = runner.run(runner.Settings(), ["gone/bmojo"], out_dir="out", command="test")
    assert [m["name"] for m in only_own["models"]] == ["gone/bmojo"]
    with pytest.raises(FileNotFoundError, match="gone/bmojo"):  # other settings: not reused
        runner.run(runner.Settings(examples=2), ["gone/bmojo"], out_dir="out", command="test")
    (tmp_path / "out/long_context_models/gone+other_eidetic_memory_off.json").unlink()
    with pytest.raises(FileNotFoundError, match="gone/other"):  # a memory-off record missing
        runner.run(runner.Settings(), ["gone/other"], out_dir="out", command="test",
                   memories_off=["eidetic"])


@pytest.mark.slow
def test_runner_end_to_end(corpus, documents, tmp_path, monkeypatch):
    """The suite on a tiny randomly initialised B'MOJO (training context 32), into a tmp dir; a
    rerun reuses the model's kept record, and a new checkpoint step, a model trained again
    with another config in the same workdir, or a record of an older format is evaluated
    again."""
    config = training.default_config("bmojo")
    config.data.update(name="text_files", path=str(documents), seq_len=32, bpe_vocab_size=300)
    model = bmojo_jax.LanguageModel(bmojo_jax.ModelConfig.preset(
        "bmojo", vocab_size=corpus.vocab_size, d_model=16, n_layers=1, n_heads=2, window=16,
        chunk_size=16, d_state=4, ssm_head_dim=8, eidetic_per_chunk=2, eidetic_slots=4),
        rngs=nnx.Rngs(0))
    settings = runner.Settings(lengths=(320, 480), depths=(0.0, 1.0), examples=2, num_needles=2,
                               windows=3, score_tokens=16, batch_size=4)
    out = tmp_path / "out"
    random_model = runner.Model("workdir/random", model, corpus.tokenizer, config, 0, corpus)
    record = runner.run(settings, [random_model], out_dir=out, command="python -m test")
    assert sorted(p.name for p in out.iterdir()) == [
        "long_context.json", "long_context.md", "long_context.png", "long_context_models"]
    assert [p.name for p in (out / "long_context_models").iterdir()] == ["workdir+random.json"]
    assert json.loads((out / "long_context.json").read_text()) == json.loads(json.dumps(record))
    (m,) = record["models"]
    assert m["train_seq_len"] == 32 and m["name"] == "workdir/random"
    assert m["lengths"] == [320, 480]
    for task in ("passkey", "needle"):
        for length in ("320", "480"):
            cell = m[task][length]
            assert set(cell["accuracy"]) == {"0.0", "1.0"}
            for depth, accuracy in cell["accuracy"].items():
                right = [lc.answer_correct(t, a) for t, a in zip(cell["continuations"][depth],
                                                                 cell["answers"][depth])]
                assert len(right) == 2 and accuracy == np.mean(right)
            for by_layer in cell["memory"].values():  # where the needle is, per depth and layer
                (layer,) = by_layer.values()
                assert 0 <= layer["selection_recall"] <= 1 and 0 <= layer["reachable"] <= 1
                assert sum(layer["attention_mass"].values()) == pytest.approx(1, abs=1e-5)
            assert set(cell["memory"]) == {"0.0", "1.0"}
            assert cell["memory"]["0.0"]["0"]["reachable"] == 1  # the needle far back
            for depth, result in cell["selection"].items():  # selection against use
                assert set(result) == {f"{k}{e}" for k in ("own", "oracle", "no_slots")
                                       for e in ("", "_exact")} | {"oracle_recall"}
                (held,) = result["oracle_recall"].values()
                assert 0 < held <= 1
    by_length = m["perplexity"]["by_length"]
    assert m["perplexity"]["windows"] == 3
    assert by_length["320"]["tokens"] == by_length["480"]["tokens"] == 3 * 16
    assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in by_length.values())
    assert m["state_bytes"]["320"] == m["state_bytes"]["480"]  # B'MOJO: constant state
    for r in m["speed"].values():
        assert len(r["prefill_seconds"]) == len(r["decode_seconds"]) == runner.SPEED_ROUNDS
        assert r["decode_tokens_per_s"] == pytest.approx(
            runner.SPEED_DECODE_STEPS / np.median(r["decode_seconds"]))
        assert r["prefill_tokens_per_s"] > 0
    for r in m["copy"].values():  # an untrained model of 300 tokens copies next to nothing
        assert 0 <= r["accuracy"] < 0.1 and np.isfinite(r["loss"]) and r["loss"] > 3
    text = (out / "long_context.md").read_text()
    assert "Command: `python -m test`" in text and "| 480 | 15 |" in text
    assert "**Copy**" in text and "| 480 | 15 | 241 |" in text
    assert text.count("*Where the needle's answer tokens are while the answer is written*") == 2
    assert text.count("*Selection against use*") == 2
    assert "**Streaming inference**" in text and "| prefill tokens/s | decode tokens/s |" in text

    evaluated = []

    def evaluate(m, s):
        assert m.step == 1, "the record of step 0 with the same settings must be reused"
        evaluated.append(m.config.seed)
        return {**record["models"][0], "step": 1}

    monkeypatch.setattr(runner, "evaluate_model", evaluate)
    again = runner.run(settings, [random_model], out_dir=out, command="python -m test")
    assert again["models"] == json.loads(json.dumps(record["models"]))
    newer = runner.run(settings, [random_model._replace(step=1)], out_dir=out,
                       command="python -m test")
    assert newer["models"][0]["step"] == 1 and evaluated == [config.seed]
    retrained = config.copy_and_resolve_references()
    retrained.seed = config.seed + 1
    runner.run(settings, [random_model._replace(step=1, config=retrained)], out_dir=out,
               command="python -m test")
    assert evaluated == [config.seed, config.seed + 1]
    monkeypatch.setattr(runner, "RECORD_FORMAT", runner.RECORD_FORMAT + 1)  # a newer format
    runner.run(settings, [random_model._replace(step=1, config=retrained)], out_dir=out,
               command="python -m test")
    assert evaluated == [config.seed, config.seed + 1, config.seed + 1]
