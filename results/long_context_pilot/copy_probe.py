"""Positive control of the copy (ad hoc, kept as the record of results/long_context_pilot): the
suite's Transformer (experiments/configs/long_context.py, vocabulary 4096) trained only on random tokens
repeated once (Olsson et al. 2022's induction test as training data: 16 rows of 128 uniform tokens,
then the same 128 again), AdamW at peak lr 3e-3 (warmup 50, cosine to step 400), weight decay 0.1.
Prints the mean NLL (nats) of each copy's targets every 25 steps.

    PYTHONPATH=. python results/long_context_pilot/copy_probe.py transformer
"""
import sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from bmojo_jax import LanguageModel
from bmojo_jax.training import model_config
from experiments.configs import long_context
preset = sys.argv[1] if len(sys.argv) > 1 else "transformer"
vocab, span, steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4096, 128, 400
cfg = long_context.get_config(preset)
mc = model_config(cfg, vocab)
print(mc)
model = LanguageModel(mc, rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 50, steps), weight_decay=0.1), wrt=nnx.Param)

@nnx.jit
def step(model, opt, rows):
    def loss_fn(model):
        logits = model(rows[:, :-1])
        lp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(lp, rows[:, 1:, None], -1)[..., 0]
        return nll.mean(), nll
    (loss, nll), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return loss, nll[:, :span - 1].mean(), nll[:, span:].mean()

rng = np.random.default_rng(0)
t0 = time.time()
for i in range(steps):
    s = rng.integers(0, vocab, (16, span))
    rows = jnp.asarray(np.concatenate([s, s, s[:, :1]], 1), jnp.int32)
    loss, first, second = step(model, opt, rows)
    if i % 25 == 0 or i == steps - 1:
        print(f"step {i}: first-copy nll {float(first):.3f} second-copy nll {float(second):.3f} ({time.time()-t0:.0f}s)", flush=True)
