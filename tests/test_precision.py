"""Mixed precision, `ModelConfig.dtype="bfloat16"` (docs/design.md section 3): bfloat16
activations and weight matmuls; float32 parameters, optimizer state, scan states, LM head, logits
and loss; close to the float32 model; the Pallas kernels in bfloat16 (interpret mode on CPU)
against their float32-computing reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bmojo_jax as bj
from bmojo_jax import ops
from bmojo_jax.training import steps
from experiments.configs import tiny
from tests import helpers

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); through the embedding, two
# blocks (M and B) and the head of the test model, measured over initialisation seeds 0, 1, 2:
# the largest logit error 3-8% of the largest logit, the loss within 0.09%, the gradients'
# cosine similarity 0.9995. The tolerances leave room for other seeds and platforms.
LOGIT_TOL = 0.15  # |bf16 - f32| <= LOGIT_TOL * max(1, max |f32 logits|)
LOSS_RTOL = 5e-3  # the mean cross-entropy
GRAD_COSINE = 0.99  # cosine similarity of the flattened parameter gradients
# The Pallas kernels on bfloat16 inputs against the reference on the same inputs (which computes
# in float32): relative to the largest value, outputs and gradients.
KERNEL_TOL = 1e-2


def _pair():
    """(float32 model, bfloat16 model) with the same parameters: an SSM (`M`) and a B'MOJO (`B`)
    layer."""
    return tuple(bj.LanguageModel(helpers.config("bmojo", pattern="MB", dtype=dtype),
                                  rngs=nnx.Rngs(0)) for dtype in ("float32", "bfloat16"))


def _loss_and_grads(model, x, y):
    def loss(model):
        ce, _, aux = model.cross_entropy(x, y)
        return ce + aux, ce
    (_, ce), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return ce, nnx.state(grads, nnx.Param)


def test_bfloat16_is_close_to_float32():
    """Logits, loss and gradients of the bfloat16 model against the float32 one (tolerances at the
    top of the module); the loss, logits and gradients are float32 and finite."""
    f32, bf16 = _pair()
    x, y = helpers.tokens(4), helpers.tokens(5)
    logits, expected = bf16(x), f32(x)
    assert logits.dtype == jnp.float32
    helpers.assert_close_to_scale(logits, expected, LOGIT_TOL)
    (ce, grads), (ref_ce, ref_grads) = _loss_and_grads(bf16, x, y), _loss_and_grads(f32, x, y)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(ce, ref_ce, rtol=LOSS_RTOL)
    flat, ref_flat = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(t)])
                      for t in (grads, ref_grads))
    assert flat.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(flat)))
    cosine = jnp.dot(flat, ref_flat) / (jnp.linalg.norm(flat) * jnp.linalg.norm(ref_flat))
    assert cosine > GRAD_COSINE, float(cosine)


def test_bfloat16_matmuls_float32_state():
    """The bfloat16 model's weight matmuls run in bfloat16 (its training step's jaxpr), and its
    decoding cache (scan states, key/value rings, eidetic memory) stays float32."""
    model = _pair()[1]
    graphdef, params = nnx.split(model, nnx.Param)
    x = helpers.tokens()

    def loss(params):
        ce, _, aux = nnx.merge(graphdef, params).cross_entropy(x, x)
        return ce + aux
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    dots = [tuple(v.aval.dtype for v in e.invars) for e in helpers.jaxpr_equations(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"]
    assert (jnp.bfloat16, jnp.bfloat16) in dots
    _, cache = model.prefill(x, model.init_cache(2))
    floats = {a.dtype for a in jax.tree.leaves(cache.layers) if not jnp.issubdtype(a.dtype,
                                                                                  jnp.integer)}
    assert floats == {jnp.dtype(jnp.float32)}


def test_training_keeps_parameters_and_optimizer_state_float32():
    """A train step of a bfloat16 model: float32 parameters and optimizer state in and out, and a
    finite loss and gradient norm."""
    model_cfg = helpers.config("bmojo", dtype="bfloat16")
    train_config = tiny.get_config("bmojo")
    params = nnx.state(bj.LanguageModel(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
    opt_state = steps.make_optimizer(train_config).init(params)
    params, opt_state, metrics = steps.make_train_step(model_cfg, train_config)(
        params, opt_state, helpers.tokens(), helpers.tokens(1))
    floats = {a.dtype for a in jax.tree.leaves((params, opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))


def _attention_inputs(t=13, window=4):
    """bfloat16 q, k, v, k_fading, v_fading [1, t, 2, 8] and eidetic slots (2 per chunk, 4)."""
    q, k, v, kf, vf = (jax.random.normal(key, (1, t, 2, 8)).astype(jnp.bfloat16)
                       for key in helpers.keys(5, seed=2))
    slots = ops.select_eidetic(jax.random.normal(jax.random.PRNGKey(3), (1, t)), window=window,
                               per_chunk=2, slots=4, lag=2, implementation="reference")
    return (q, k, v, kf, vf), dict(window=window, memory_positions=slots)


def _scan_inputs(kind, t=13):
    """bfloat16 x, B, C and float32 dt, a, h0 of `ops.ssd` (mamba2) or `ops.selective_scan`."""
    k = helpers.keys(6, seed=1)
    channels = (1, t, 2, 4) if kind == "ssd" else (1, t, 4)  # [b, t, h, p] or [b, t, d]
    decay = (2,) if kind == "ssd" else (4, 3)
    state = (1, 2, 4, 3) if kind == "ssd" else (1, 4, 3)
    return (jax.random.normal(k[0], channels).astype(jnp.bfloat16),
            jax.nn.softplus(jax.random.normal(k[1], channels[:-1] if kind == "ssd" else channels)),
            -jnp.exp(jax.random.normal(k[2], decay)),
            jax.random.normal(k[3], (1, t, 3)).astype(jnp.bfloat16),
            jax.random.normal(k[4], (1, t, 3)).astype(jnp.bfloat16),
            jax.random.normal(k[5], state))


@pytest.mark.parametrize("kernel", ["memory_attention", "ssd", "selective_scan"])
def test_pallas_kernels_in_bfloat16(kernel):
    """Each Pallas kernel on bfloat16 inputs (interpret mode on CPU) against the reference on the
    same inputs: outputs and the VJP of a random cotangent, within KERNEL_TOL of the largest
    value; outputs and gradients keep the documented dtypes."""
    if kernel == "memory_attention":
        args, options = _attention_inputs()

        def run(implementation):
            return lambda q, k, v, kf, vf: ops.memory_attention(
                q, k, v, k_fading=kf, v_fading=vf, implementation=implementation, **options)
    else:
        args = _scan_inputs(kernel)
        op = getattr(ops, kernel)

        def run(implementation):
            return lambda *a: op(*a, chunk_size=8, implementation=implementation)

    def check(actual, expected, grad):
        helpers.assert_close_to_scale(actual, expected, KERNEL_TOL)

    out, grads = helpers.assert_vjp_matches(run("pallas"), run("reference"), args, check)
    out = jax.tree.leaves(out)
    assert out[0].dtype == (jnp.float32 if kernel == "memory_attention" else jnp.bfloat16)
    assert [g.dtype for g in grads] == [a.dtype for a in args]
