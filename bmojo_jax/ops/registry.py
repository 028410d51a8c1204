"""One entry point per op, several implementations behind it (DESIGN.md section 4).

`implementation=None` picks the best implementation for the default backend; a named implementation
that the op does not have fails loudly instead of silently falling back.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax

# Best implementation per backend when the caller passes implementation=None. The `xla` path is the
# fast default on CPU and the fallback everywhere; accelerators switch once Pallas kernels land.
_DEFAULTS = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def pick(op_name: str, implementations: Mapping[str, Callable], implementation: Optional[str]):
    """Returns the function registered for `implementation` under `op_name`.

    Raises:
      ValueError: `implementation` is not one of the op's implementations.
    """
    if implementation is None:
        implementation = _DEFAULTS.get(jax.default_backend(), "xla")
    if implementation not in implementations:
        raise ValueError(f"{op_name}: implementation={implementation!r} is not available; "
                         f"choose one of {sorted(implementations)} or None (best for the backend).")
    return implementations[implementation]
