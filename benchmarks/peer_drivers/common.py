"""The stdin/stdout protocol shared by the peer drivers (see `__init__`), and the JAX peers' training
step. No third-party imports at module level (the PyTorch driver imports this too)."""

import argparse
import json
import sys
import time


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--variant", default="")
    return parser.parse_args()


def serve(step, info):
    """step(): one blocking training step. info: JSON-able dict announced with "ready"."""
    step()  # warm-up (and compilation, for JAX)
    print(json.dumps(dict(info, ready=True)), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        if command == "step":
            start = time.perf_counter()
            step()
            print(json.dumps(dict(seconds=time.perf_counter() - start)), flush=True)


def jax_train_step(loss_fn, params, tokens):
    """The JAX peers' training step, as `step()` for `serve`: value_and_grad of
    `loss_fn(params, tokens)`, optax AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1: ours), one
    jit-compiled function with donated parameters and optimizer state, blocking on the loss."""
    import jax
    import optax

    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

    def train_step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = [params, optimizer.init(params)]
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, tokens).compile()

    def step():
        state[0], state[1], loss = compiled(state[0], state[1], tokens)
        jax.block_until_ready(loss)
    return step
