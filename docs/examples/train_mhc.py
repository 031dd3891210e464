"""Train a small MLP stack with mHC (n = 4 streams) against the same stack with plain residual
connections, on a synthetic regression task; print the losses and plot both curves.

    python docs/examples/train_mhc.py                      # CPU, backend="auto" (numba)
    python docs/examples/train_mhc.py --backend numpy      # the float64 reference
    python docs/examples/train_mhc.py --device cuda        # GPU, backend="auto" (triton)
    python docs/examples/train_mhc.py --dtype bf16         # model.bfloat16(): 16-bit weights
    python docs/examples/train_mhc.py --recompute auto     # keep fewer streams for the backward
"""
from __future__ import annotations

import argparse
import time

import torch

from mhc_multi import MHCStack, expand_streams, merge_streams


class MLPBlock(torch.nn.Module):
    """Pre-norm MLP: [B,S,D] -> [B,S,D]."""

    def __init__(self, D: int, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.up = torch.nn.Linear(D, hidden)
        self.down = torch.nn.Linear(hidden, D)

    def forward(self, h):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(h))))


class MHCModel(torch.nn.Module):
    """The blocks in an MHCStack: the hidden state is expanded to n streams and merged back."""

    def __init__(self, D=64, n=4, layers=4, backend="auto", sinkhorn_iters=20, recompute=None):
        super().__init__()
        self.n = n
        self.stack = MHCStack([MLPBlock(D, 2 * D) for _ in range(layers)], n, D,
                              sinkhorn_iters=sinkhorn_iters, backend=backend, recompute=recompute)

    def forward(self, h):
        return merge_streams(self.stack(expand_streams(h, self.n))) / self.n


class ResidualStack(torch.nn.Module):
    """The same blocks with plain residual connections: h = h + block(h)."""

    def __init__(self, D=64, layers=4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(MLPBlock(D, 2 * D) for _ in range(layers))

    def forward(self, h):
        for block in self.blocks:
            h = h + block(h)
        return h


def make_task(D: int, seed: int, device):
    """A fixed random teacher (a deeper tanh MLP); inputs are fresh Gaussian tokens."""
    g = torch.Generator().manual_seed(seed)
    W = [torch.randn(D, D, generator=g) / D ** 0.5 for _ in range(3)]
    W = [w.to(device) for w in W]

    def batch(B, S):
        h = torch.randn(B, S, D, device=device)
        y = h
        for w in W:
            y = y + torch.tanh(y @ w) * 1.5
        return h, y

    return batch


def train(model, batch, steps, lr, B, S, log_every=50, label="", dtype=torch.float32):
    """AdamW on the model's parameters (of any dtype); inputs in ``dtype``, the loss in fp32."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        h, y = batch(B, S)
        loss = torch.nn.functional.mse_loss(model(h.to(dtype)).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"{label:>9} step {step:4d}  loss {loss.item():.4f}", flush=True)
    return losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto", help="auto | numba | numpy | triton")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the models' parameters and activations (model.to(dtype))")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--sinkhorn", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute", default=None,
                   help="MHCStack's recompute: a group size, or auto (default: none)")
    p.add_argument("--plot", default=None, help="write the two loss curves to this PNG")
    a = p.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    batch = make_task(a.dim, a.seed, a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    curves = {}
    recompute = a.recompute if a.recompute in (None, "auto") else int(a.recompute)
    for label, build in (("mHC n=4", lambda: MHCModel(a.dim, 4, a.layers, a.backend, a.sinkhorn,
                                                      recompute)),
                         ("residual", lambda: ResidualStack(a.dim, a.layers))):
        torch.manual_seed(a.seed)
        model = build().to(device=a.device, dtype=dtype)
        t0 = time.perf_counter()
        curves[label] = train(model, batch, a.steps, 3e-3, 8, 16, label=label, dtype=dtype)
        print(f"{label}: {a.steps} steps in {time.perf_counter() - t0:.1f} s, "
              f"loss {curves[label][0]:.4f} -> {curves[label][-1]:.4f}")
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, ys in curves.items():
            ax.plot(ys, label=label, lw=1)
        ax.set(xlabel="step", ylabel="MSE loss", yscale="log",
               title=f"{a.layers} MLP blocks, D={a.dim}, {a.dtype}, backend={a.backend}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")
    return curves


if __name__ == "__main__":
    main()
