"""The same model in PyTorch eager, nanoGPT style, for the benchmark's third column.

Optional: `pip install torch` (the benchmark skips these rows, saying so, when it
is missing). Same architecture as minitx_fn: fixed sinusoidal positions (or a learned table)
added to a token embedding, pre-norm blocks with one fused QKV projection, causal attention
through `F.scaled_dot_product_attention` (PyTorch's fused kernel; `fused=False`
writes softmax(QK^T/sqrt(K) + M)V out instead), tanh-GELU MLP, final layer norm and
a linear head (or the embedding, tied); AdamW with the same betas, clipping and decay mask (at a constant
learning rate: the schedule is one scalar per step).

`from_minitx` copies a minitx_fn parameter tree into the module, so both start
from the same weights and their first losses agree (the benchmark checks it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minitx_fn.layers import positional
from minitx_fn.config import ModelConfig, TrainConfig


class Block(nn.Module):
    def __init__(self, c: ModelConfig, fused: bool):
        super().__init__()
        self.c, self.fused = c, fused
        self.ln1, self.ln2 = nn.LayerNorm(c.d_model, eps=c.ln_eps), nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.qkv, self.out = nn.Linear(c.d_model, 3 * c.d_model), nn.Linear(c.d_model, c.d_model)
        self.up, self.down = nn.Linear(c.d_model, c.d_ff), nn.Linear(c.d_ff, c.d_model)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)                                       # 3 x (B, T, D)
        q, k, v = (a.view(b, t, self.c.n_heads, -1).transpose(1, 2) for a in (q, k, v))   # (B, H, T, K)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                 # (B, H, T, T)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))


class TorchLM(nn.Module):
    def __init__(self, c: ModelConfig, fused: bool = True):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.positions == "learned":
            self.pos = nn.Embedding(c.max_len, c.d_model)
        else:
            self.register_buffer("pe", torch.from_numpy(np.array(positional.table(c.max_len, c.d_model))))
        self.blocks = nn.ModuleList(Block(c, fused) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        # Tied as nanoGPT ties it: the head's weight is the embedding's (one tensor), no bias.
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=not c.tie_embeddings)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        pe = self.pos.weight[:t] if self.c.positions == "learned" else self.pe[:t]
        x = self.embed(tokens) + pe
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def from_minitx(self, params: dict) -> "TorchLM":
        """Copy a minitx_fn float32 parameter tree in (our (in, out) matrices are torch's (out, in))."""
        t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
        self.embed.weight.copy_(t(params["embed"]["table"]))
        self.ln_f.weight.copy_(t(params["ln_f"]["scale"]))
        self.ln_f.bias.copy_(t(params["ln_f"]["bias"]))
        if "pos" in params:
            self.pos.weight.copy_(t(params["pos"]["table"]))
        if "head" in params:
            self.head.weight.copy_(t(params["head"]["w"]).T)
            self.head.bias.copy_(t(params["head"]["b"]))
        stacked = params["blocks"]
        for i, blk in enumerate(self.blocks):
            for ln in ("ln1", "ln2"):
                getattr(blk, ln).weight.copy_(t(stacked[ln]["scale"][i]))
                getattr(blk, ln).bias.copy_(t(stacked[ln]["bias"][i]))
            for mine, (group, name) in {"qkv": ("attn", "qkv"), "out": ("attn", "out"),
                                        "up": ("mlp", "up"), "down": ("mlp", "down")}.items():
                getattr(blk, mine).weight.copy_(t(stacked[group][name]["w"][i]).T)
                getattr(blk, mine).bias.copy_(t(stacked[group][name]["b"][i]))
        return self


def make_step(c: ModelConfig, tc: TrainConfig, params: dict, *, fused: bool = True):
    """(step(x, y) -> loss tensor, model): forward, backward, clip, AdamW, as nanoGPT's loop does."""
    lm = TorchLM(c, fused).from_minitx(params)
    decay = [p for n, p in lm.named_parameters() if n.endswith("weight") and p.dim() == 2]
    no_decay = [p for n, p in lm.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.optimizer.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.optimizer.lr, betas=(tc.optimizer.b1, tc.optimizer.b2), eps=1e-8)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = lm(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), tc.optimizer.grad_clip)
        opt.step()
        return loss.detach()

    step.optimizer = opt                  # a caller with a schedule sets each group's lr before a step
    return step, lm
