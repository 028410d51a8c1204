"""The canonical-form bilinear realization: the one state-space model behind the whole family.

docs/design.md section 1. A realization updates a state from inputs u_t with an input-dependent
affine map

    x_t = A(u_t) x_{t-1} + B(u_t) u_t,        x_t = (s_t, xi_t)

where A(u) is block diagonal:
    shift block  s_t  [n_shift, d]: the controllable canonical (companion) form
                 A_s = [[0, 1, 0, ..], [0, 0, 1, ..], .., [c_0, c_1, .., c_{n-1}]],  B_s = e_{n-1}.
                 With feedback c = 0, A_s is the nilpotent shift (A_s^n = 0): s_t holds exactly the
                 last n inputs, oldest first (eidetic, finite span: a Transformer's window). With
                 c != 0 the block is an IIR filter (fading).
    diagonal block xi_t [d, d_state]: A_d(u) = diag(exp(dt(u) a)), a < 0, B_d(u) = dt(u) B(u):
                 the selective SSM of Mamba (fading, unbounded span).
Readout: y_t = xi_t C(u_t) (the SSM's), and the caller may read the window s_t (as attention does).

Evaluation is `jax.lax.associative_scan` over the affine maps (A_t, b_t), composed as
(A2 A1, A2 b1 + b2); `sequential=True` runs the same maps with `lax.scan` (the reference). This
module is for reading and checking the paper's claim in a notebook; the production layers use the
specialised ops in `bmojo_jax.ops`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class CanonicalRealization(nnx.Module):
    """Shift block + diagonal block + optional companion feedback, over [batch, time, d_model]."""

    def __init__(self, d_model: int, *, n_shift: int, d_state: int, feedback: bool = False,
                 rngs: nnx.Rngs):
        if n_shift < 0 or d_state < 0 or n_shift + d_state == 0:
            raise ValueError(f"n_shift={n_shift}, d_state={d_state}: both must be >= 0 and at "
                             f"least one > 0.")
        self.n_shift, self.d_state = n_shift, d_state
        self.feedback = nnx.Param(jnp.zeros((n_shift,))) if feedback else None
        if d_state:
            self.dt_proj = nnx.Linear(d_model, d_model, rngs=rngs)
            self.B_proj = nnx.Linear(d_model, d_state, use_bias=False, rngs=rngs)
            self.C_proj = nnx.Linear(d_model, d_state, use_bias=False, rngs=rngs)
            self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(
                jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_model, d_state))))

    def companion(self):
        """A_s [n_shift, n_shift]: the up-shift with the feedback row c last (zeros: pure shift)."""
        a = jnp.eye(self.n_shift, k=1)
        return a if self.feedback is None else a.at[-1].set(self.feedback[...])

    def selective_inputs(self, u):
        """The diagonal block's (dt [b,t,d], a [d,n], B [b,t,n], C [b,t,n]), as `ops.selective_scan`
        takes them."""
        dt = jax.nn.softplus(self.dt_proj(u))
        return dt, -jnp.exp(self.A_log[...]), self.B_proj(u), self.C_proj(u)

    def __call__(self, u, *, sequential: bool = False):
        """Runs the realization over u [b, t, d_model] (float32).

        Returns:
          window [b, t, n_shift, d_model]: the shift-block state s_t after each step;
          fading [b, t, d_model, d_state]: the diagonal-block state xi_t;
          y [b, t, d_model]: the readout xi_t C(u_t) (zeros without a diagonal block).
        """
        b, t, d = u.shape
        maps = {}
        if self.n_shift:
            a_s = jnp.broadcast_to(self.companion(), (b, t, self.n_shift, self.n_shift))
            b_s = jnp.zeros((b, t, self.n_shift, d)).at[:, :, -1].set(u)
            maps["shift"] = (a_s, b_s)
        if self.d_state:
            dt, a, B, C = self.selective_inputs(u)
            maps["diagonal"] = (jnp.exp(dt[..., None] * a), (dt * u)[..., None] * B[:, :, None, :])
        states = _sequential(maps) if sequential else jax.lax.associative_scan(_compose, maps, axis=1)
        window = states["shift"][1] if self.n_shift else jnp.zeros((b, t, 0, d))
        if not self.d_state:
            return window, jnp.zeros((b, t, d, 0)), jnp.zeros_like(u)
        fading = states["diagonal"][1]
        return window, fading, jnp.einsum("btdn,btn->btd", fading, C)


def _compose(first, second):
    """(A1, b1) then (A2, b2) = (A2 A1, A2 b1 + b2), per block: matrix for shift, diagonal else."""
    out = {}
    if "shift" in first:
        (a1, b1), (a2, b2) = first["shift"], second["shift"]
        out["shift"] = (a2 @ a1, a2 @ b1 + b2)
    if "diagonal" in first:
        (a1, b1), (a2, b2) = first["diagonal"], second["diagonal"]
        out["diagonal"] = (a2 * a1, a2 * b1 + b2)
    return out


def _sequential(maps):
    """The same maps applied one step at a time from a zero state (the reference)."""
    def step(state, m):
        new = {}
        if "shift" in m:
            a, b = m["shift"]
            new["shift"] = a @ state["shift"] + b
        if "diagonal" in m:
            a, b = m["diagonal"]
            new["diagonal"] = a * state["diagonal"] + b
        return new, new

    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), maps)
    zero = {name: jnp.zeros_like(b[:, 0]) for name, (_, b) in maps.items()}
    _, states = jax.lax.scan(step, zero, time_major)
    return {name: (None, jnp.swapaxes(s, 0, 1)) for name, s in states.items()}
