"""Llama-family decoder (Llama, SmolLM2, TinyLlama, Qwen3): RMSNorm pre-norm blocks with rotary positions,
grouped-query attention and a SwiGLU MLP in a TiedStack, a final RMSNorm and a tied or untied LM head.

Module and parameter names inside a block are Hugging Face's (``self_attn.q_proj``, ``mlp.gate_proj``,
``input_layernorm``, ...), so a checkpoint maps onto it by renaming only the prefixes (tyingrun.models.hf_llama).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tyingrun.config import ModelConfig
from tyingrun.contracts import LossResult, TiedModule
from tyingrun.models.blocks import init_normal
from tyingrun.models.embeddings import TokenEmbedding, next_token_loss
from tyingrun.tying.stack import TiedStack


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, the statistics computed in fp32 whatever the input's dtype (as Hugging Face's)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half layout of Hugging Face checkpoints: feature i pairs with feature i + head_dim / 2."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_tables(length: int, head_dim: int, theta: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, [length, head_dim], computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class GroupedQueryAttention(nn.Module):
    """Causal attention with ``n_kv_head`` key/value heads, each serving ``n_head / n_kv_head`` query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, kv_heads(cfg), head_width(cfg)
        self.dropout = cfg.dropout
        width, bias = cfg.d_model, cfg.attention_bias
        self.q_proj = nn.Linear(width, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, width, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def _heads(self, projected: torch.Tensor, norm_name: str) -> torch.Tensor:
        batch, length, _ = projected.shape
        heads = projected.view(batch, length, -1, self.head_dim)
        norm = getattr(self, norm_name, None)
        return (heads if norm is None else norm(heads)).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k = self._heads(self.q_proj(x), "q_norm"), self._heads(self.k_proj(x), "k_norm")
        v = self._heads(self.v_proj(x), "")
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, self.n_head * self.head_dim))

    def attention_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token of the score and value products over the whole sequence (the causal mask is not
        subtracted), per query head: 2 * 2 * seq_len * n_head * head_dim (grouping shares keys, not products)."""
        return 4 * seq_len * self.n_head * self.head_dim


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_width(cfg)
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x))."""

    # policy.share=attention|mlp: the sublayer (its QK-norms included) and, with share_norms, its pre-norm.
    sublayers = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = GroupedQueryAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_head or cfg.n_head


def head_width(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_head


def mlp_width(cfg: ModelConfig) -> int:
    return cfg.d_ff or 4 * cfg.d_model


class Llama(TiedModule):
    task = "lm"

    def __init__(self, cfg: ModelConfig, vocab_size: int, grad_mode: str = "shared"):
        super().__init__()
        self.cfg = cfg
        self.tokens = TokenEmbedding(vocab_size, cfg.d_model, cfg.tie_embeddings, cfg.pad_vocab_to)
        self.stack = TiedStack([LlamaBlock(cfg) for _ in range(cfg.n_layer)], grad_mode)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        init_normal(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens.embed(input_ids)
        cos, sin = rotary_tables(input_ids.shape[1], head_width(self.cfg), self.cfg.rope_theta, x.device)
        return self.tokens.project(self.norm(self.stack(x, cos=cos, sin=sin)))

    def loss(self, batch: Dict[str, torch.Tensor]) -> LossResult:
        return next_token_loss(self(batch["input_ids"]), batch["labels"])
