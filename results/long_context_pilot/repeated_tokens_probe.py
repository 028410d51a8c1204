"""Olsson's repeated random tokens as training rows (ad hoc, kept as the record of
results/long_context_pilot): the suite's Transformer (experiments/configs/long_context.py) trained
on batches of 16 rows, N_COPY of them 128 random tokens then the same 128 again, the others plain
Austen windows (T = 256), AdamW at peak lr 3e-3 (warmup 100, cosine), weight decay 0.1, for STEPS
steps; then `diagnostics.induction_test` at copy spans 32, 64 and 128. Prints the mean NLL (nats)
of each copy's targets in the copy rows and of the text rows every 50 steps.

    PYTHONPATH=. python results/long_context_pilot/repeated_tokens_probe.py 4 1000
"""
import sys, time
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from bmojo_jax import LanguageModel, data
from bmojo_jax.training import model_config
from experiments.configs import long_context
n_copy, steps, span = int(sys.argv[1]), int(sys.argv[2]), 128
cfg = long_context.get_config("transformer")
text = data.TextData("austen", batch_size=16, seq_len=256, bpe_vocab_size=4096)
vocab = text.vocab_size
model = LanguageModel(model_config(cfg, vocab), rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 100, steps), weight_decay=0.1), wrt=nnx.Param)

@nnx.jit
def step(model, opt, inputs, targets):
    def loss_fn(model):
        lp = jax.nn.log_softmax(model(inputs), -1)
        nll = -jnp.take_along_axis(lp, targets[..., None], -1)[..., 0]
        return nll.mean(), nll
    (loss, nll), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return nll

rng = np.random.default_rng(0)
t0 = time.time()
for i in range(steps):
    x, y = text.train_batch(i)
    x, y = x.copy(), y.copy()
    s = rng.integers(300, vocab, (n_copy, span))
    rows = np.concatenate([s, s, s[:, :1]], 1)
    x[:n_copy], y[:n_copy] = rows[:, :-1], rows[:, 1:]
    nll = step(model, opt, jnp.asarray(x), jnp.asarray(y))
    if i % 50 == 0 or i == steps - 1:
        nll = np.asarray(nll)
        print(f"step {i}: copy rows first {nll[:n_copy, :span-1].mean():.3f} second {nll[:n_copy, span:].mean():.3f}; text {nll[n_copy:].mean():.3f} ({time.time()-t0:.0f}s)", flush=True)
from bmojo_jax import diagnostics
for sp in (32, 64, 128):
    print(f"induction_test span {sp}:", diagnostics.induction_test(model, 300, vocab, span=sp), flush=True)
