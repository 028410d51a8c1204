"""The model family: shapes, causality, special cases, implementations agree, parameter counts,
dropout and rematerialisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax.training import steps
from experiments.configs import tiny
from tests import helpers
from tests.helpers import T, VOCAB, WINDOW, config, tokens


@pytest.fixture(scope="module")
def models():
    return {name: bj.LanguageModel(config(name), rngs=nnx.Rngs(0)) for name in bj.PRESETS}


@pytest.mark.parametrize("preset", [*bj.PRESETS, *(f"bmojo-{rule}" for rule in helpers.RULES)])
def test_shapes_and_causality(models, preset):
    """Logits [b, t, vocab] float32, finite; a token changed at p changes no logit before p and
    the one at p: every preset, and B'MOJO with every selection rule."""
    model = models.get(preset) or bj.LanguageModel(
        config("bmojo", **helpers.RULES[preset.split("-")[1]]), rngs=nnx.Rngs(0))
    x = tokens()
    logits = model(x)
    assert logits.shape == (2, T, VOCAB) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    for p in (5, 17, T - 1):
        changed = model(x.at[:, p].set((x[:, p] + 1) % VOCAB))
        np.testing.assert_allclose(changed[:, :p], logits[:, :p], rtol=0, atol=1e-6)
        assert not np.allclose(changed[:, p], logits[:, p])


# entry "evicted": 2 slots of 1 selection per chunk, lag 2, fill by chunk 3; the first evicted
# token is stored for chunk 5 (module docstring of ops.eidetic.storage)
STORE = {"window": (dict(storage_slots=8, storage_topk=3), 2),
         "evicted": (dict(storage_slots=8, storage_topk=3, storage_entry="evicted",
                          eidetic_slots=2), 5)}


@pytest.mark.parametrize("entry", list(STORE))
def test_storage_is_causal_and_read(entry):
    """The in-storage memory (storage_slots): no logit depends on a later token, and the
    retrieved tokens change the logits of the chunks from the first with a stored token on
    only (none is stored before)."""
    overrides, first = STORE[entry]
    with_store = bj.LanguageModel(config("bmojo", **overrides), rngs=nnx.Rngs(0))
    without = bj.LanguageModel(config("bmojo", eidetic_slots=overrides.get("eidetic_slots", 3)),
                               rngs=nnx.Rngs(0))
    x = tokens()
    logits = with_store(x)
    for p in (5, 17):
        changed = with_store(x.at[:, p].set((x[:, p] + 1) % VOCAB))
        np.testing.assert_allclose(changed[:, :p], logits[:, :p], rtol=0, atol=1e-6)
    plain = without(x)
    start = first * WINDOW
    np.testing.assert_allclose(logits[:, :start], plain[:, :start], rtol=0, atol=1e-5)
    assert not np.allclose(logits[:, start:start + WINDOW], plain[:, start:start + WINDOW])

def test_storage_knobs_refuse_bad_values():
    with pytest.raises(ValueError, match="storage_topk=0: must be in"):
        config("bmojo", storage_slots=8)
    with pytest.raises(ValueError, match="storage_entry='evicted'.*needs eidetic_slots > 0"):
        config("bmojo", storage_slots=8, storage_topk=2, storage_entry="evicted",
               eidetic_slots=0, eidetic_per_chunk=0)
    with pytest.raises(ValueError, match="storage_entry='all'"):
        config("bmojo", storage_slots=8, storage_topk=2, storage_entry="all")
    for recall in (0.0, 1.5, "0.9"):
        with pytest.raises(ValueError, match=rf"storage_recall={recall!r}: must be a number in"):
            config("bmojo", storage_slots=8, storage_topk=2, storage_recall=recall)


def test_eidetic_memory_changes_the_output(models):
    """The `B` model reads its eidetic slots: clearing the slots changes late logits only."""
    model = models["bmojo"]
    x = tokens()
    with_memory = model(x)
    selections = [block.mixer.selection for block in model.blocks]
    for block in model.blocks:
        block.mixer.selection = None
    try:
        without = model(x)
    finally:
        for block, selection in zip(model.blocks, selections):
            block.mixer.selection = selection
    first_visible = 2 * WINDOW  # selections of chunk 0 are visible from chunk 2 on
    # float32 rounding: the slots' masked keys change the softmax's summation order (~2e-6 seen)
    np.testing.assert_allclose(without[:, :first_visible], with_memory[:, :first_visible],
                               atol=1e-5)
    assert np.abs(without[:, first_visible:] - with_memory[:, first_visible:]).max() > 1e-2


def test_bmojo_without_eidetic_slots_is_bmojo_f():
    x = tokens(1)
    bmojo = bj.LanguageModel(config("bmojo", eidetic_per_chunk=0, eidetic_slots=0),
                             rngs=nnx.Rngs(3))
    bmojo_f = bj.LanguageModel(config("bmojo_f"), rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(bmojo(x), bmojo_f(x))


def test_bmojo_f_without_fading_path_is_swa():
    x = tokens(2)
    bmojo_f = bj.LanguageModel(config("bmojo_f"), rngs=nnx.Rngs(4))
    swa = bj.LanguageModel(config("swa"), rngs=nnx.Rngs(5))
    with_fading = bmojo_f(x)
    for block in bmojo_f.blocks:
        block.mixer.fading = nnx.data(None)  # remove the fading path
    nnx.update(swa, nnx.state(bmojo_f))  # every remaining parameter is shared
    np.testing.assert_allclose(bmojo_f(x), swa(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_fading, swa(x))


def test_window_longer_than_sequence_is_full_attention():
    x = tokens(3)
    swa = bj.LanguageModel(config("swa", window=T), rngs=nnx.Rngs(6))
    transformer = bj.LanguageModel(config("transformer"), rngs=nnx.Rngs(6))
    np.testing.assert_allclose(swa(x), transformer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(ssm_kind="mamba1", eidetic_eviction="score", innovation_predictor="identity",
         tie_fading_kv=False, tie_embeddings=False),
], ids=["default", "variants"])
def test_xla_cross_entropy_matches_reference_loss_and_gradients(overrides):
    """The xla model's training loss (`cross_entropy`: fused head + loss) against the reference
    model's logits and a plain masked log-softmax, with some targets unlabelled."""
    x, y = tokens(4), tokens(5).at[:, ::4].set(-100)

    def loss_and_grads(implementation):
        model = bj.LanguageModel(config("bmojo", implementation=implementation, **overrides),
                                 rngs=nnx.Rngs(7))

        def loss(model):
            if implementation == "xla":
                ce, labelled, aux = model.cross_entropy(x, y)
                assert int(labelled) == int(jnp.sum(y >= 0))
                return ce + aux
            logits, aux = model.forward(x)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], -1)
            return -jnp.sum(jnp.where(y >= 0, logp[..., 0], 0)) / jnp.sum(y >= 0) + aux

        value, grads = nnx.value_and_grad(loss)(model)
        return value, nnx.state(grads, nnx.Param)

    value, grads = loss_and_grads("xla")
    ref_value, ref_grads = loss_and_grads("reference")
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bad_tokens(models):
    model = models["transformer"]
    with pytest.raises(ValueError, match=r"token id 50 at position \(0, 3\).*0\.\.49"):
        model(tokens().at[0, 3].set(VOCAB))
    with pytest.raises(ValueError, match="token id -1"):
        model(tokens().at[1, 0].set(-1))
    with pytest.raises(ValueError, match="integer \\[batch, time\\]"):
        model(jnp.zeros((T,), jnp.int32))
    with pytest.raises(ValueError, match=r"target id 50 at position \(0, 2\).*or negative"):
        model.cross_entropy(tokens(), tokens().at[0, 2].set(VOCAB))
    with pytest.raises(ValueError, match="must have the shape of tokens"):
        model.cross_entropy(tokens(), tokens()[:, 1:])
    listed = tokens().tolist()  # a Python list: a clear error from every entry point
    for call in (model, lambda x: model.cross_entropy(x, x), model.eidetic_trace,
                 lambda x: model.prefill(x, model.init_cache(2, max_length=T)),
                 lambda x: model.decode_step(x[0], model.init_cache(2, max_length=T))):
        with pytest.raises(ValueError, match="tokens must be an integer array.*got a list"):
            call(listed)


def test_preset_parameter_counts_are_close():
    """At the size of `experiments/param_counts.py`, counts stay within 25% of each other."""
    from experiments.param_counts import parameter_counts
    counts = parameter_counts()
    assert set(counts) == set(bj.PRESETS)
    assert max(counts.values()) <= 1.25 * min(counts.values()), counts


def test_d_ff_zero_is_the_mixer_alone():
    """d_ff = 0 drops each block's MLP and its norm, nothing else (Mamba's block); a negative
    width is refused by name."""
    with_mlp, alone = config("mamba", d_ff=16), config("mamba", d_ff=0)
    d = with_mlp.d_model
    mlp_params = with_mlp.n_layers * (3 * d * 16 + d)  # SwiGLU gate, up, down + RMSNorm scale
    assert bj.param_count(with_mlp) - bj.param_count(alone) == mlp_params
    model = bj.LanguageModel(alone, rngs=nnx.Rngs(0))
    assert all(block.mlp is None for block in model.blocks)
    assert np.all(np.isfinite(model(tokens())))
    with pytest.raises(ValueError, match=r"ModelConfig.d_ff=-8: must be an integer >= 0"):
        config("mamba", d_ff=-8)


def test_match_d_ff_is_closest():
    """`match_d_ff` picks the multiple of 8 whose non-embedding count is closest to the target."""
    target = bj.param_count(config("transformer"), embedding=False)
    matched = bj.match_d_ff(config("bmojo"), target)
    assert matched.d_ff % 8 == 0 and matched.d_ff != config("bmojo").hidden_dim

    def gap(d_ff):
        return abs(bj.param_count(matched.replace(d_ff=d_ff), embedding=False) - target)
    assert gap(matched.d_ff) <= min(gap(matched.d_ff - 8), gap(matched.d_ff + 8))
    assert bj.param_count(matched) == bj.count_params(bj.LanguageModel(matched, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("preset", ["bmojo"])
def test_short_input_memory_follows_the_input_not_the_window(preset):
    """A window of 65,536 tokens on a 40-token input compiles to small buffers (the time axis
    used to be padded to the window: ~17 GB at d_model 512), with the same logits."""
    model = bj.LanguageModel(config(preset, window=65_536), rngs=nnx.Rngs(0))
    x = tokens(t=40)
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2 ** 20
    small = bj.LanguageModel(config(preset, window=64), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model(x), small(x), atol=1e-5)


# ---------------------------------------------------------------- dropout and rematerialisation

DROPOUTS = ("embedding_dropout", "residual_dropout", "attention_dropout")


def test_dropout_rate_zero_is_the_deterministic_model(models):
    """Rates 0 (the default): a dropout key changes nothing, bit for bit."""
    x = tokens()
    model = models["swa"]
    np.testing.assert_array_equal(model.forward(x, dropout_key=jax.random.key(1))[0], model(x))


@pytest.mark.parametrize("field", DROPOUTS)
def test_dropout_acts_in_training_only(models, field):
    """With a rate > 0: training outputs (a dropout key) differ across keys and repeat for one
    key; without a key (evaluation) the model is the rate-0 model with the same parameters."""
    x = tokens()
    model = bj.LanguageModel(config("swa", **{field: 0.5}), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(model(x), models["swa"](x))
    first, second = (model.forward(x, dropout_key=jax.random.key(k))[0] for k in (1, 2))
    assert not np.allclose(first, second) and not np.allclose(first, model(x))
    np.testing.assert_array_equal(model.forward(x, dropout_key=jax.random.key(1))[0], first)


@pytest.mark.slow  # a train step's compile
def test_train_step_dropout_key_is_a_function_of_seed_and_step():
    """The train step draws its dropout key from (config.seed, the optimizer's step count): the
    same state and batch give the same loss (exact resume), another step another one."""
    model_cfg = config("swa", n_layers=1, residual_dropout=0.3)  # the cheapest to compile
    x, y = tokens(), tokens(1)
    params = nnx.state(bj.LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    train_config = tiny.get_config("swa")
    train_step = steps.make_train_step(model_cfg, train_config)
    fresh = steps.make_optimizer(train_config).init(params)

    def loss_at(step):
        """The loss of a train step from the same parameters with the optimizer at `step`."""
        opt_state = optax.tree_utils.tree_set(fresh, count=jnp.asarray(step, jnp.int32))
        _, opt_state, metrics = train_step(*jax.tree.map(jnp.copy, (params, opt_state)), x, y)
        assert int(steps.optimizer_step(opt_state)) == step + 1
        return float(metrics["loss"])

    first = loss_at(0)
    assert loss_at(0) == first and loss_at(1) != first
    assert not jnp.array_equal(jax.random.key_data(steps.dropout_key(0, 0)),
                               jax.random.key_data(steps.dropout_key(1, 0)))


@functools.cache
def _remat_gradients(remat):
    """(the policies of the checkpoints in the gradient's jaxpr, the parameter gradients) of the
    training loss of a one-layer `B` model (attention, fading SSM, eidetic memory and its sown
    innovation loss inside the checkpoint) with dropout (a fixed key) and `remat`."""
    x, y = tokens(4), tokens(5)
    model = bj.LanguageModel(config("bmojo", n_layers=1, remat=remat, residual_dropout=0.2,
                                    attention_dropout=0.2), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        ce, _, aux = nnx.merge(graphdef, params).cross_entropy(x, y,
                                                               dropout_key=jax.random.key(3))
        return ce + aux
    traced = jax.jit(jax.grad(loss)).trace(params)
    policies = [e.params["policy"] for e in helpers.jaxpr_equations(traced.jaxpr.jaxpr)
                if "policy" in e.params and "prevent_cse" in e.params]
    return policies, traced.lower().compile()(params)


@pytest.mark.slow  # three compiles of fwd + bwd
@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_keeps_the_gradients(remat):
    """`remat` checkpoints every block with its policy (the gradient's jaxpr) and keeps the
    gradients of "none" (float32 tolerance), dropout included (the recomputation replays the
    masks)."""
    policies, grads = _remat_gradients(remat)
    none_policies, expected = _remat_gradients("none")
    assert none_policies == [] and policies == [bj.model.REMAT_POLICIES[remat]]
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_control_rules_random_is_positional_and_projection_follows_the_content():
    """`random` scores every sequence alike (position only); `projection` scores each token by its
    layer input on a fixed direction, so different sequences keep different positions, and the
    same tokens score the same at any batch row."""
    x = jax.random.randint(jax.random.key(5), (2, T), 0, VOCAB)
    for rule in ("random", "projection"):
        model = bj.LanguageModel(config("bmojo", eidetic_selection=rule, eidetic_seed=1),
                                 rngs=nnx.Rngs(0))
        scores = np.asarray(model.eidetic_trace(x)[0]["scores"])
        assert np.isfinite(scores).all()
        if rule == "random":
            np.testing.assert_array_equal(scores[0], scores[1])
        else:
            assert not np.allclose(scores[0], scores[1])
            swapped = np.asarray(model.eidetic_trace(x[::-1])[0]["scores"])
            np.testing.assert_allclose(swapped, scores[::-1], rtol=1e-6, atol=1e-6)
