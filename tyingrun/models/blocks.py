"""Transformer building blocks: SDPA self-attention, the GELU MLP, the pre-LN and post-LN blocks, and their init."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, causal: bool):
        super().__init__()
        self.n_head = n_head
        self.causal = causal
        self.dropout = dropout
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal
        )
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.c_proj(y))

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the score and value products (q k^T and p v), counted over the whole
        sequence as the kernels compute them (a causal mask is not subtracted): 2 * 2 * seq_len * width."""
        return 4 * seq_len * self.c_proj.in_features


class MLP(nn.Module):
    def __init__(self, d_model: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.c_proj = nn.Linear(4 * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class PreLNBlock(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2, ViT)."""

    # What policy.share=attention|mlp shares: (the sublayer's module, its layer norm) by parameter-name prefix.
    sublayers = {"attention": ("attn", "ln_1"), "mlp": ("mlp", "ln_2")}

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.attn = SelfAttention(d_model, n_head, dropout, bias, causal)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def residual_projections(self):
        return [self.attn.c_proj.weight, self.mlp.c_proj.weight]


class PostLNBlock(nn.Module):
    """ln(x + attn(x)), then ln(x + mlp(x)) (BERT)."""

    sublayers = {"attention": ("attn", "ln_1"), "mlp": ("mlp", "ln_2")}

    def __init__(self, d_model: int, n_head: int, dropout: float, bias: bool, causal: bool):
        super().__init__()
        self.attn = SelfAttention(d_model, n_head, dropout, bias, causal)
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.mlp = MLP(d_model, dropout, bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x))
        return self.ln_2(x + self.mlp(x))


def init_normal(model: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) weights for every Linear and Embedding, zero Linear biases (GPT-2 and BERT init)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
