"""policy=recursive: convert a trained model (train.init_from) into a recursive one.

docs/method.md#recursive-conversion has the definitions and the SVD initialisation.

The model's stack gets policy.pattern's map with policy.n_sets unique blocks; each unique block is initialised
from the source layers it replaces (policy.init); with policy.lora_rank = r > 0 every slot that shares its weight
matrices gets, per matrix, a rank-r correction ``scale * B @ A`` (scale = lora_alpha / r) initialised from the
truncated SVD of (the source layer's matrix - the shared matrix), and keeps its own biases and layer norms, so at
full rank the converted model computes exactly what the source does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, List, Tuple, cast

import torch
from torch import nn

from tyingrun.config import PolicyConfig, registry_of
from tyingrun.errors import BadInput
from tyingrun.files import WEIGHTS_FILE
from tyingrun.models.embeddings import TokenEmbedding
from tyingrun.models.hf_gpt2 import HF_CONFIG, read_hf_config
from tyingrun.models.hf_llama import read_hf_config as read_hf_llama_config
from tyingrun.policies import recursive_map, stack_sharing  # noqa: F401 (export reads it here)
from tyingrun.train.checkpoint import read_state
from tyingrun.train.hf_import import is_llama_folder
from tyingrun.train.init_from import check_depth, init_from
from tyingrun.tying import maps
from tyingrun.tying.stack import lora_key
from tyingrun.tying.weights import read_tensors


def lora_slots(src: List[int]) -> List[int]:
    """The slots whose weights are shared: tied slots and the roots they read."""
    roots = {root for slot, root in enumerate(src) if root != slot}
    return [slot for slot, root in enumerate(src) if root != slot or slot in roots]


def prepare(model: nn.Module, cfg: PolicyConfig) -> None:
    """Give the model's stack the LoRA tensors of policy.lora_rank (zeros), so a checkpoint of it loads back."""
    if cfg.name != "recursive" or cfg.lora_rank == 0:
        return
    src = recursive_map(cfg, len(model.stack))
    alpha = cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha
    model.stack.add_lora(lora_slots(src), cfg.lora_rank, alpha)


def source_shape(source: Path) -> Dict[str, int]:
    """Depth, width and vocabulary of a train.init_from source, read from its files."""
    if (source / HF_CONFIG).is_file():
        hf_cfg = read_hf_llama_config(source) if is_llama_folder(source) else read_hf_config(source)[0]
        return {"n_layer": hf_cfg.n_layer, "d_model": hf_cfg.d_model, "vocab_size": hf_cfg.vocab_size}
    tensors = read_tensors(source / WEIGHTS_FILE)
    wte = tensors.get("tokens.wte.weight")
    if wte is None:
        raise BadInput(f"train.init_from={source} holds no token embedding; policy=recursive converts a GPT-2 or a "
                       f"Llama")
    _, state = read_state(source)
    return {"n_layer": len(state["map"]), "d_model": wte.shape[1], "vocab_size": wte.shape[0]}


def check_source(model: nn.Module, source: Path, cfg: PolicyConfig) -> None:
    """One line naming the key, for a source the conversion cannot use."""
    shape = source_shape(source)
    tokens = cast(TokenEmbedding, model.tokens)
    ours = {"n_layer": len(model.stack), "d_model": tokens.wte.embedding_dim, "vocab_size": tokens.wte.num_embeddings}
    if shape["vocab_size"] != ours["vocab_size"]:
        raise BadInput(f"policy=recursive: train.init_from={source} has a vocabulary of {shape['vocab_size']} tokens "
                       f"but this run's is {ours['vocab_size']}; use the dataset and tokenizer the source trained on "
                       f"(dataset.tokenizer=from_model for a Hugging Face model)")
    if shape["d_model"] != ours["d_model"]:
        raise BadInput(f"policy=recursive: train.init_from={source} has width {shape['d_model']} but "
                       f"model.d_model={ours['d_model']}; set model.d_model={shape['d_model']}")
    try:
        recursive_map(cfg, shape["n_layer"])
    except ValueError as err:
        raise BadInput(f"policy=recursive: policy.pattern={cfg.pattern} cannot use policy.n_sets={cfg.n_sets} with "
                       f"the source's {shape['n_layer']} layers: {err}") from None
    check_depth(source, shape["n_layer"], ours["n_layer"], "policy=recursive: train.init_from")


def region(pattern: str, n_layer: int) -> range:
    """The slots the shared blocks serve: all of them, or all but the first and last (middle patterns)."""
    return range(1, n_layer - 1) if pattern.startswith("middle") else range(n_layer)


# policy.init: the source layers a shared block starts from, given (the first slot the blocks serve, how many they
# serve, the number of blocks, the block's index, the slots it serves).
INIT_SOURCES: Dict[str, Callable[[int, int, int, int, List[int]], List[int]]] = registry_of("policy.init", {
    "stepwise": lambda offset, middle, k, index, served: [offset + (index * middle) // k],
    "average": lambda offset, middle, k, index, served: served,
    "lower": lambda offset, middle, k, index, served: [offset + index],
    "upper": lambda offset, middle, k, index, served: [offset + middle - k + index],
    "random": lambda offset, middle, k, index, served: [],
})


def init_layers(cfg: PolicyConfig, n_layer: int) -> Dict[int, List[int]]:
    """For each root of the map, the source layers whose (mean) weights it starts from (random: [])."""
    src = recursive_map(cfg, n_layer)
    slots = region(cfg.pattern, n_layer)
    offset, middle, k = slots.start, len(slots), cfg.n_sets
    roots = sorted({src[slot] for slot in slots})
    chosen = {}
    for index, root in enumerate(roots):
        served = [slot for slot in slots if src[slot] == root]
        chosen[root] = INIT_SOURCES[cfg.init](offset, middle, k, index, served)
    return chosen


def _svd_factors(delta: torch.Tensor, rank: int, scale: float):
    """B, A with scale * B @ A the best rank-``rank`` approximation of ``delta``; directions with no singular
    value get A random and B zero (as plain LoRA starts), so that they still learn."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    # A rank above the matrix's smaller side (a grouped-query key or value projection is narrower than the model)
    # gets the missing directions as directions without a singular value.
    missing = max(0, rank - s.numel())
    u = torch.cat((u[:, :rank], u.new_zeros(u.shape[0], missing)), dim=1)
    s = torch.cat((s[:rank], s.new_zeros(missing)))
    vh = torch.cat((vh[:rank], vh.new_zeros(missing, vh.shape[1])))
    root = (s / scale).sqrt()
    b, a = u * root, root[:, None] * vh
    dead = s <= s.max().clamp_min(1e-30) * 1e-7 if s.numel() else s.bool()
    if dead.any():
        generator = torch.Generator().manual_seed(rank * 7919 + delta.shape[0])
        fresh = torch.randn(int(dead.sum()), delta.shape[1], generator=generator, dtype=a.dtype)
        a[dead] = fresh.to(a.device) / delta.shape[1] ** 0.5
        b[:, dead] = 0
    return b.to(delta.dtype), a.to(delta.dtype)


@torch.no_grad()
def convert(model: nn.Module, source: Path, cfg: PolicyConfig) -> Tuple[Dict[str, object], nn.Module]:
    """Load ``source`` into ``model`` as policy=recursive's converted model; returns what the summary records and
    the source itself (every slot its own, no LoRA), so that its own losses can be measured beside the converted
    model's."""
    check_source(model, source, cfg)
    stack = model.stack
    n_layer = len(stack)
    # The source, every slot its own: a copy of the model without ties or LoRA, loaded from its files.
    original = copy.deepcopy(model)
    original.stack.lora = nn.ModuleList([nn.ModuleDict() for _ in original.stack.blocks])
    original.stack.set_sharing("block", False)
    init_from(original, source)
    original.stack.apply_map(maps.identity(n_layer), [True] * n_layer)
    layers = [{name: p.detach().clone() for name, p in block.named_parameters()} for block in original.stack.blocks]
    # Everything outside the stack is the source's.
    targets = dict(model.named_parameters())
    for name, param in original.named_parameters():
        if not name.startswith("stack.") and name in targets:
            targets[name].copy_(param)
    src = recursive_map(cfg, n_layer)
    # Every slot computes with its source layer; then the map ties, and the roots take their initial blocks.
    fresh = {root: {n: p.detach().clone() for n, p in stack.blocks[root].named_parameters()} for root in set(src)}
    stack.apply_map(maps.identity(n_layer), [True] * n_layer)
    for slot, block in enumerate(stack.blocks):
        for name, param in block.named_parameters():
            param.copy_(layers[slot][name])
    stack.apply_map(src, [True] * n_layer)
    chosen = init_layers(cfg, n_layer)
    for root, from_layers in chosen.items():
        for name, param in stack.blocks[root].named_parameters():
            if name not in stack.shared:
                continue
            if from_layers:
                param.copy_(torch.stack([layers[layer][name] for layer in from_layers]).mean(0))
            else:
                param.copy_(fresh[root][name])
    for slot, corrections in enumerate(stack.lora):
        for name, param in stack.blocks[src[slot]].named_parameters():
            key = lora_key(name)
            if key in corrections:
                lora = corrections[key]
                b, a = _svd_factors(layers[slot][name] - param, lora.A.shape[0], lora.scale)
                lora.B.copy_(b)
                lora.A.copy_(a)
    info = {"source": str(source), "pattern": cfg.pattern, "n_sets": cfg.n_sets, "init": cfg.init,
            "lora_rank": cfg.lora_rank, "init_layers": {str(root): layers_ for root, layers_ in chosen.items()}}
    return info, original
