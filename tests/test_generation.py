"""generate and generate_text: clear errors for bad arguments (before anything is compiled); one
compiled program per bucket, whose result is the unpadded prompt's; text in, text out with an
end-of-text stop and a warning for unknown words."""

import contextlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax import data
from bmojo_jax.data import end_of_text_id
from bmojo_jax.generation import generate_text, sample_logits
from bmojo_jax.training.checkpoints import SyntheticTask
from tests.helpers import config, tokens

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # recorded by every XLA compile


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gets one entry per XLA compilation inside the block."""
    compiles = []

    def listener(event, duration_secs, **kwargs):
        if event == COMPILE_EVENT:
            compiles.append(duration_secs)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _tiny_model(vocab_size=16):
    return bj.LanguageModel(bj.ModelConfig.preset("swa", vocab_size=vocab_size, d_model=8,
                                                  n_heads=2, window=4, n_layers=1,
                                                  ssm_head_dim=8), rngs=nnx.Rngs(0))


PROMPT = np.zeros((1, 4), np.int32)


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_model()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=2.5), r"max_new_tokens=2.5: must be an integer >= 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens=-1"),
    (dict(temperature=float("nan")), r"temperature=nan: must be a finite number"),
    (dict(temperature=float("inf")), r"temperature=inf"),
    (dict(temperature=-1), r"temperature=-1"),
    (dict(temperature="hot"), r"temperature='hot'"),
    (dict(top_k=2.5), r"top_k=2.5: must be an integer"),
    (dict(top_k=-1), r"top_k=-1"),
    (dict(prompt=[[1, 2, 3]]), r"prompt is a list: generate takes int token ids \[batch, time\]"),
    (dict(prompt="the company"), r"prompt is a str: .*generate_text"),
    (dict(prompt=np.zeros(4, np.int32)), r"prompt has shape \(4,\).*prompt\[None\]"),
    (dict(prompt=np.zeros((1, 4), np.float32)), r"prompt tokens must be integer.*float32"),
    (dict(prompt=np.full((1, 4), 16)), r"prompt token id 16 at position \(0, 0\)"),
])
def test_bad_arguments(tiny_model, kwargs, match):
    args = dict(prompt=PROMPT, max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        bj.generate(tiny_model, **args)


def test_zero_new_tokens_and_top_k_one_is_greedy(tiny_model):
    assert bj.generate(tiny_model, PROMPT, 0).shape == (1, 0)
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
    key = jax.random.PRNGKey(1)
    sample = jax.jit(sample_logits)
    np.testing.assert_array_equal(sample(logits, key, 1.0, 1), logits.argmax(-1))
    np.testing.assert_array_equal(sample(logits, key, 0.0, 0), logits.argmax(-1))
    # top_k=3 samples only among the 3 largest logits of each row.
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    draws = [np.asarray(sample(logits, k, 5.0, 3)) for k in jax.random.split(key, 20)]
    assert all(d[row] in top3[row] for d in draws for row in range(3))
    assert len({d[0] for d in draws}) > 1  # it does sample


@pytest.mark.slow
def test_buckets_give_the_unpadded_result_without_recompiling():
    """Prompt lengths 4..7 (one bucket: 4 prefilled in parallel, the rest stepped), 5..8 new
    tokens (one bucket), greedy and sampled with top-k: one compilation, and the tokens are those
    of the unpadded sequence's parallel forward. `hybrid` has an SSM and a full-attention layer."""
    model = bj.LanguageModel(config("hybrid"), rngs=nnx.Rngs(0))
    x = np.asarray(tokens())
    runs = [(5, dict(temperature=0)), (6, dict(temperature=0.7, top_k=3, seed=4)),
            (7, dict(temperature=1.0, seed=4)), (4, dict(temperature=0))]
    with count_compiles() as compiles:
        outputs = [bj.generate(model, x[:, :t], 12 - t, **kw) for t, kw in runs[:1]]
        first = len(compiles)
        outputs += [bj.generate(model, x[:, :t], 12 - t, **kw) for t, kw in runs[1:]]
    assert first >= 1 and len(compiles) == first  # the counter works; nothing recompiled

    forward = nnx.jit(lambda model, sequence: model(sequence))
    for (t, kw), new in zip(runs, outputs):
        assert new.shape == (2, 12 - t) and new.dtype == np.int32
        sequence = jnp.concatenate([x[:, :t], new], axis=1)
        logits = forward(model, sequence[:, :-1])[:, t - 1:]  # [2, new tokens, vocab]
        key = jax.random.PRNGKey(kw.get("seed", 0))
        expected = [sample_logits(logits[:, j], jax.random.fold_in(key, j), kw["temperature"],
                                  kw.get("top_k") or 0) for j in range(12 - t)]
        np.testing.assert_array_equal(new, np.stack(expected, axis=1), err_msg=f"t={t} {kw}")


def _word_tokenizer(eos_id, unk_id, words=()):
    """A 16-word tokenizer (the tiny model's vocabulary): `words`, then w<i> for id i, with <eos>
    and <unk> at the ids given."""
    vocab = list(words) + [f"w{i}" for i in range(len(words), 16)]
    vocab[eos_id], vocab[unk_id] = "<eos>", "<unk>"
    return data.WordTokenizer(vocab)


def test_generate_text_stops_at_end_of_text(tiny_model):
    prompt_ids = np.array([[1, 2, 3, 4]], np.int32)
    new = bj.generate(tiny_model, prompt_ids, 12, seed=1)[0]
    eos = next(int(i) for i in new[2:] if i not in (1, 2, 3, 4))  # a token the model produces
    unk = next(i for i in range(16) if i not in (1, 2, 3, 4, eos))
    tok = _word_tokenizer(eos, unk)
    assert (tok.unknown_id, end_of_text_id(tok)) == (unk, eos)
    text = generate_text(tiny_model, tok, "w1 w2 w3 w4", 12, seed=1)
    cut = int(np.argmax(new == eos))
    assert text == tok.decode(np.concatenate([prompt_ids[0], new[:cut]]))
    assert "\n" not in text and "\n" in generate_text(tiny_model, tok, "w1 w2 w3 w4", 12, seed=1,
                                                         stop_at_eos=False)


def test_generate_text_warns_about_unknown_words(tiny_model):
    tok = _word_tokenizer(14, 15, words=["the", "quantum", "company", "said"])
    with pytest.warns(UserWarning, match=r"words 'The', 'Quantum', 'zorblax' are not in the "
                      r"vocabulary and became <unk>; in lower case 'the', 'quantum' are known"):
        text = generate_text(tiny_model, tok, "The Quantum zorblax said", 12, temperature=0)
    assert text.startswith("<unk> <unk> <unk> said")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_text(tiny_model, tok, "the quantum company said", 12, temperature=0)
    with pytest.raises(ValueError, match="prompt='' encodes to no token"):
        generate_text(tiny_model, tok, "", 12)


def test_end_of_text_of_bpe_and_synthetic_tasks():
    bpe = data.BPETokenizer.train(["the harbour was quiet before dawn"], vocab_size=300)
    assert end_of_text_id(bpe) == 0  # <|endoftext|>
    assert end_of_text_id(SyntheticTask("mqar", dict(vocab_size=16), 8)) is None
