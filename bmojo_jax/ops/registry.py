"""One entry point per op, several implementations behind it (docs/design.md section 4).

Each op keeps a table {implementation name: entry}. An entry is the implementation function itself,
or a `Lazy` reference to one, imported the first time it is picked: the `pallas` entries are lazy,
so that `import bmojo_jax` loads no Pallas module (nor its TPU/Triton backends) unless a Pallas
implementation is asked for.

`implementation=None` picks the best implementation for the default backend; a named implementation
that the op does not have fails loudly instead of silently falling back.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Mapping, Optional, Union

import jax

# Best implementation per backend when the caller passes implementation=None. The `xla` path is the
# fast default on CPU and the fallback everywhere; accelerators switch once the kernels win there.
_DEFAULTS = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


@dataclasses.dataclass(frozen=True)
class Lazy:
    """An implementation imported when picked: the attribute `name` of the module `module`.

    Attributes:
      module: absolute module name, e.g. "bmojo_jax.ops.ssm.pallas".
      name: the function in that module, e.g. "ssd".
    """
    module: str
    name: str

    def load(self) -> Callable:
        """Imports the module (once; Python caches it) and returns the function."""
        return getattr(importlib.import_module(self.module), self.name)


Entry = Union[Callable, Lazy]


def pick(op_name: str, implementations: Mapping[str, Entry], implementation: Optional[str]):
    """Returns the function registered for `implementation` under `op_name`.

    Args:
      op_name: the op's public name, for error messages.
      implementations: {name: function or `Lazy`}.
      implementation: one of the names, or None for the backend's default (`_DEFAULTS`).

    Raises:
      ValueError: `implementation` is not one of the op's implementations.
    """
    if implementation is None:
        implementation = _DEFAULTS.get(jax.default_backend(), "xla")
    if implementation not in implementations:
        raise ValueError(f"{op_name}: implementation={implementation!r} is not available; "
                         f"choose one of {sorted(implementations)} or None (best for the backend).")
    entry = implementations[implementation]
    return entry.load() if isinstance(entry, Lazy) else entry
