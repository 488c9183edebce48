"""The registry of models: how each is built, and the kind of data it trains on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Tuple

from tyingrun.config import ModelConfig
from tyingrun.contracts import TiedModule
from tyingrun.models.bert import BERT
from tyingrun.models.gpt2 import GPT2
from tyingrun.models.llama import Llama
from tyingrun.models.vit import ViT


@dataclass(frozen=True)
class ModelSpec:
    """``build(model config, data, gradient mode)``; ``task``: "lm" (token blocks) or "vision" (labelled images);
    ``tasks``: every kind of data it trains on (GPT-2 also "reasoning": answer-only prompts)."""

    build: Callable[[ModelConfig, Any, str], TiedModule]
    task: str
    also: Tuple[str, ...] = ()

    @property
    def tasks(self) -> Tuple[str, ...]:
        return (self.task, *self.also)


MODELS = {
    "gpt2": ModelSpec(lambda cfg, data, grad_mode: GPT2(cfg, cfg.vocab_size or data.vocab_size, grad_mode), GPT2.task,
                      also=("reasoning",)),
    "llama": ModelSpec(
        lambda cfg, data, grad_mode: Llama(cfg, cfg.vocab_size or data.vocab_size, grad_mode), Llama.task),
    "bert": ModelSpec(lambda cfg, data, grad_mode: BERT(cfg, cfg.vocab_size or data.vocab_size, grad_mode), BERT.task),
    "vit": ModelSpec(
        lambda cfg, data, grad_mode: ViT(cfg, data.image_size, data.channels, data.n_classes, grad_mode), ViT.task),
}
