"""Streaming inference: decode_step and prefill reproduce the parallel forward; the state has a
fixed size; generate is deterministic and greedy at temperature 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from tests.helpers import RULES, T, VOCAB, config, tokens

VARIANTS = {name: {} for name in bj.PRESETS}
VARIANTS.update({
    "bmojo-score-lag1": dict(eidetic_eviction="score", eidetic_lag=1),
    "bmojo-lag3-mamba1-untied": dict(eidetic_lag=3, ssm_kind="mamba1", tie_fading_kv=False,
                                     innovation_predictor="identity"),
    **{f"bmojo-{rule}": overrides for rule, overrides in RULES.items()},
    "bmojo-threshold-score": dict(RULES["threshold"], eidetic_eviction="score"),
    "bmojo-state-score": dict(RULES["state"], eidetic_eviction="score"),
    "bmojo-quantile-score": dict(RULES["quantile"], eidetic_eviction="score"),
    "bmojo-storage": dict(storage_slots=8, storage_topk=3),
    "bmojo-storage-evicted": dict(storage_slots=3, storage_topk=2, storage_entry="evicted",
                                  eidetic_slots=2),
    "bmojo-storage-evicted-score": dict(storage_slots=4, storage_topk=3,
                                        storage_entry="evicted", eidetic_eviction="score",
                                        eidetic_slots=2, storage_recall=0.9),  # exact on CPU
    "mamba-no-mlp": dict(d_ff=0),
    "bmojo-storage-score-no-slots": dict(storage_slots=12, storage_topk=2,
                                         eidetic_eviction="score", eidetic_per_chunk=0,
                                         eidetic_slots=0),
})
PREFIX = 13  # not a multiple of the window


def _model(name):
    preset = name.split("-")[0]
    return bj.LanguageModel(config(preset, **VARIANTS[name]), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decoding_reproduces_parallel_logits(name):
    model = _model(name)
    x = tokens()
    expected = model(x)
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode_all(state, x, cache):
        model = nnx.merge(graphdef, state)

        def step(cache, token):
            logits, cache = model.decode_step(token, cache)
            return cache, logits
        return jnp.swapaxes(jax.lax.scan(step, cache, x.T)[1], 0, 1)

    @jax.jit
    def prefill_then_decode(state, x):
        model = nnx.merge(graphdef, state)
        head, cache = model.prefill(x[:, :PREFIX], model.init_cache(2, max_length=T))
        return jnp.concatenate([head, decode_all(state, x[:, PREFIX:], cache)], axis=1)

    stepped = decode_all(state, x, model.init_cache(2, max_length=T))
    np.testing.assert_allclose(stepped, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(prefill_then_decode(state, x), expected, rtol=1e-4, atol=1e-4)


def _bytes(tree):
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["bmojo", "bmojo_f", "mamba", "swa"])
def test_state_size_does_not_grow(preset):
    model = bj.LanguageModel(config(preset), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, cache, n):
        model = nnx.merge(graphdef, state)

        def step(i, cache):
            return model.decode_step((i * 7 % VOCAB)[None].repeat(2), cache)[1]
        return jax.lax.fori_loop(0, n, step, cache)

    short = run(state, model.init_cache(2), 10)
    long = run(state, model.init_cache(2), 10_000)
    assert int(long.position) == 10_000
    assert _bytes(short) == _bytes(long)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(long)
               if leaf.dtype == np.float32 and leaf.ndim > 2)  # caches hold no NaN/inf


def test_full_attention_needs_max_length():
    model = bj.LanguageModel(config("transformer"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs max_length"):
        model.init_cache(2)
    with pytest.raises(ValueError, match="exceeds the full-attention cache"):
        model.prefill(tokens(), model.init_cache(2, max_length=8))


def test_prefill_needs_empty_cache_and_decode_checks_tokens():
    model = bj.LanguageModel(config("bmojo"), rngs=nnx.Rngs(0))
    _, cache = model.prefill(tokens()[:, :5], model.init_cache(2))
    with pytest.raises(ValueError, match="position 5"):
        model.prefill(tokens(), cache)
    with pytest.raises(ValueError, match="token id 50"):
        model.decode_step(jnp.array([1, VOCAB]), cache)


def test_generate_is_deterministic_and_greedy_at_zero_temperature():
    model = bj.LanguageModel(config("bmojo"), rngs=nnx.Rngs(0))
    prompt = tokens()[:, :6]
    a = bj.generate(model, prompt, 9, temperature=1.0, top_k=5, seed=3)
    b = bj.generate(model, prompt, 9, temperature=1.0, top_k=5, seed=3)
    assert a.shape == (2, 9) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    greedy = bj.generate(model, prompt, 9, temperature=0)
    # The model is causal, so one parallel pass over prompt + output gives every step's argmax.
    sequence = jnp.concatenate([prompt, jnp.asarray(greedy)], axis=1)
    np.testing.assert_array_equal(greedy, np.asarray(model(sequence[:, :-1])[:, 5:].argmax(-1)))
    with pytest.raises(ValueError, match="temperature=-1"):
        bj.generate(model, prompt, 3, temperature=-1)


def test_oracle_scores_decode_equals_forward():
    """`eidetic_scores` (an oracle; -inf = never kept) replace the rule's scores in the parallel
    forward, prefill and decode_step alike, and they change what the model reads."""
    model = _model("bmojo")
    x = tokens()
    scores = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    scores = jnp.where(jnp.arange(T) % 3 == 0, -jnp.inf, scores)
    expected = model(x, eidetic_scores=scores)
    assert not np.allclose(expected, model(x), atol=1e-4)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill_then_decode(state, x, scores):
        model = nnx.merge(graphdef, state)
        head, cache = model.prefill(x[:, :PREFIX], model.init_cache(2),
                                    eidetic_scores=scores[:, :PREFIX])

        def step(cache, inputs):
            token, score = inputs
            logits, cache = model.decode_step(token, cache, eidetic_scores=score)
            return cache, logits
        tail = jax.lax.scan(step, cache, (x[:, PREFIX:].T, scores[:, PREFIX:].T))[1]
        return jnp.concatenate([head, jnp.swapaxes(tail, 0, 1)], axis=1)

    np.testing.assert_allclose(prefill_then_decode(state, x, scores), expected, rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match="eidetic_scores must be float"):
        model(x, eidetic_scores=scores[:, :5])


# every mixer letter (hybrid: M and A), both evictions, the store, the position-keyed rule
PACKED = ("swa", "hybrid", "bmojo_f", "bmojo-score-lag1", "bmojo-random", "bmojo-storage",
          "bmojo-storage-evicted")
STARTS = (8, 12)  # three packed documents in T tokens, starting at multiples of the window


@pytest.mark.parametrize("name", PACKED)
def test_packed_documents_are_the_documents_one_by_one(name):
    """segment_ids: every document's logits equal those it gets alone (window, fading keys, SSM,
    conv and eidetic slots all restart), and decoding after a packed prefill continues the last
    document as if it had been prefilled alone."""
    model = _model(name)
    x = tokens(t=T + 4)
    prompt, rest = x[:, :T], x[:, T:]
    segment_ids = jnp.asarray(np.searchsorted(STARTS, np.arange(T), side="right")[None]
                              .repeat(2, 0))
    packed = model(prompt, segment_ids=segment_ids)
    for lo, hi in zip((0,) + STARTS, STARTS + (T,)):
        np.testing.assert_allclose(packed[:, lo:hi], model(prompt[:, lo:hi]), rtol=1e-4,
                                   atol=1e-4)
    _, cache = model.prefill(prompt, model.init_cache(2, max_length=T + 4),
                             segment_ids=segment_ids)
    _, alone = model.prefill(prompt[:, STARTS[-1]:], model.init_cache(2, max_length=T + 4))
    for token in rest.T:
        got, cache = model.decode_step(token, cache)
        expected, alone = model.decode_step(token, alone)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_the_quantile_variant_gates_tokens_the_ungated_rule_keeps():
    """The "bmojo-quantile" variant's slots differ from the same rule without the gate (the same
    weights: both rules have the predictor), so the decode == forward test checks the decoding
    gate, not only slots that both would hold."""
    x = tokens()
    ungated = bj.LanguageModel(config("bmojo", **dict(RULES["quantile"],
                                                      eidetic_selection="fading")),
                               rngs=nnx.Rngs(0))
    assert not np.allclose(_model("bmojo-quantile")(x), ungated(x), atol=1e-3)


def test_packed_documents_refuse_what_does_not_restart():
    x = tokens()
    segment_ids = jnp.zeros(x.shape, jnp.int32)
    for name, match in (("bmojo-state", "'state' takes no segment_ids"),
                        ("bmojo-threshold", "'threshold' takes no segment_ids"),
                        ("bmojo-quantile", "'quantile' takes no segment_ids")):
        with pytest.raises(ValueError, match=match):
            _model(name)(x, segment_ids=segment_ids)
    with pytest.raises(ValueError, match=r"segment_ids must be integer \[2, 29\]"):
        _model("swa")(x, segment_ids=segment_ids[:, :-1])


@pytest.mark.parametrize("name", ["bmojo", "bmojo-score-lag1", "bmojo-storage-score-no-slots",
                                  "bmojo-storage-evicted-score"])
def test_decoding_after_a_packed_prefill_reproduces_the_packed_forward(name):
    """Documents that start inside chunks, at other positions in each row: prefill the first
    PREFILL tokens packed, decode the rest (the last document goes on), and get the packed
    forward's logits. A prompt shorter than storage_topk runs too."""
    model = _model(name)
    x = tokens()
    starts = ((14,), (9, 22))  # per row; not multiples of the window
    segment_ids = jnp.asarray(np.stack([np.searchsorted(s, np.arange(T), side="right")
                                        for s in starts]))
    expected = model(x, segment_ids=segment_ids)
    for prefill in (23, 24):
        logits, cache = model.prefill(x[:, :prefill], model.init_cache(2, max_length=T),
                                      segment_ids=segment_ids[:, :prefill])
        got = [logits]
        for token in x[:, prefill:].T:
            step, cache = model.decode_step(token, cache)
            got.append(step[:, None])
        np.testing.assert_allclose(jnp.concatenate(got, 1), expected, rtol=1e-4, atol=1e-4)
    model(x[:, :1])  # fewer tokens than storage_topk
