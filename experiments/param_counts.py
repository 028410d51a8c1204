"""Prints the parameter counts of the six presets at one size (docs/design.md section 3: fair
comparisons).

    python -m experiments.param_counts [--d_model=256 --n_layers=4 --vocab_size=10000]

Counts are exact (from the initialised modules, via `jax.eval_shape`, so nothing is allocated):
total, and without the (tied) token embedding.
"""

from __future__ import annotations

from absl import app, flags

import bmojo_jax as bj

SIZE = dict(vocab_size=10000, d_model=256, n_layers=4, n_heads=4, window=64)


def parameter_counts(embedding: bool = True, **size) -> dict[str, int]:
    """{preset: number of parameters} at `SIZE` updated by `size` (with or without embeddings)."""
    counts = {}
    for name in bj.PRESETS:
        counts[name] = bj.param_count(bj.ModelConfig.preset(name, **{**SIZE, **size}), embedding)
    return counts


def main(argv):
    del argv
    size = {key: flags.FLAGS[key].value for key in SIZE}
    total, body = parameter_counts(**size), parameter_counts(embedding=False, **size)
    print(f"Parameter counts at {size}:")
    print(f"{'preset':<12} {'total':>12} {'non-embedding':>14} {'vs transformer':>15}")
    for name in bj.PRESETS:
        print(f"{name:<12} {total[name]:>12,} {body[name]:>14,} "
              f"{total[name] / total['transformer']:>14.2f}x")
    spread = max(total.values()) / min(total.values())
    print(f"max/min total = {spread:.3f} (must stay <= 1.25)")


for _key, _value in SIZE.items():
    flags.DEFINE_integer(_key, _value, f"ModelConfig.{_key}")

if __name__ == "__main__":
    app.run(main)
