"""A small causal Transformer in PyTorch (CPU wheel), attention by
`torch.nn.functional.scaled_dot_product_attention(is_causal=True)`: one training step at the peer
shapes. Written for this benchmark (not a third-party model), mirroring our `transformer` preset:
pre-norm blocks (RMSNorm -> attention with RoPE -> residual -> RMSNorm -> SwiGLU -> residual), 4 heads,
SwiGLU hidden 8/3 d_model rounded up to a multiple of 8, tied embeddings, no biases. Step: forward,
next-token cross-entropy, backward, torch.optim.AdamW (same hyper-parameters as ours), eager mode
(--variant=compile: torch.compile on the model).
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, cos, sin):  # x [b, h, t, e]; rotate channel halves (as bmojo_jax.ops.rope)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, d, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Transformer(nn.Module):
    def __init__(self, vocab, d, layers, heads, context):
        super().__init__()
        hidden = -(-8 * d // 3 // 8) * 8
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = RMSNorm(d)
        e = d // heads
        freqs = 10000.0 ** (-torch.arange(0, e // 2, dtype=torch.float64) * 2.0 / e)
        angles = torch.arange(context, dtype=torch.float64)[:, None] * freqs
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return self.norm(x) @ self.embed.weight.T


def main():
    args = common.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = Transformer(args.vocab, args.d_model, args.layers, 4, args.context)
    n_params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if args.variant == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1))

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = forward(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss)

    assert math.isfinite(step())
    common.serve(step, dict(params=n_params, package=f"torch {torch.__version__}",
                            threads=torch.get_num_threads(),
                            config="eager" if args.variant != "compile" else "torch.compile"))


if __name__ == "__main__":
    main()
