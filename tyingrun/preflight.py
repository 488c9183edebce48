"""Every check a config must pass, run before any data is loaded or any model is built.

``config.check`` holds what the schema alone can say (ranges, choices, fields that must agree); this module
adds what needs the registries of models, datasets and policies, and words every problem once, in the keys a
user types. Lower layers raise plain errors; nothing after ``preflight`` should fail on a config value.
"""

from __future__ import annotations

from dataclasses import fields

from tyingrun import config as config_module
from tyingrun.config import Config, PolicyConfig
from tyingrun.data.build import DATASET_IMAGE_SIZES, DATASET_TASKS
from tyingrun.data.reasoning import check_reasoning_config
from tyingrun.errors import BadInput
from tyingrun.models import MODELS
from tyingrun.policies import POLICIES, recursive_map
from tyingrun.policies.fixed import given_map
from tyingrun.policies.looped import later_loop_slots, max_loops

POLICY_DEFAULTS = PolicyConfig()


def preflight(cfg: Config, world_size: int = 1) -> None:
    """Raise BadInput, naming the key and the fix, for the first problem of ``cfg``."""
    config_module.check(cfg)
    check_model_and_dataset(cfg)
    check_policy(cfg)
    check_tied_lr(cfg)
    if cfg.train.batch_size % world_size:
        raise BadInput(
            f"train.batch_size={cfg.train.batch_size} does not split evenly over {world_size} data-parallel ranks; "
            f"make it a multiple of {world_size}"
        )


def check_model_and_dataset(cfg: Config) -> None:
    model, dataset = cfg.model.name, cfg.dataset.name
    if model not in MODELS:
        raise BadInput(f"model.name={model!r} is not a model; choose one of: {', '.join(MODELS)}")
    tasks = MODELS[model].tasks
    suitable = [name for name, kind in DATASET_TASKS.items() if kind in tasks]
    if dataset not in suitable:
        problem = "is not a dataset" if dataset not in DATASET_TASKS else f"does not suit model={model}"
        raise BadInput(f"dataset={dataset} {problem}; model={model} trains on one of: {', '.join(suitable)}")
    image_size = DATASET_IMAGE_SIZES.get(dataset)
    if image_size is not None and image_size % cfg.model.patch_size:
        raise BadInput(
            f"model.patch_size={cfg.model.patch_size} does not divide the dataset's {image_size}-pixel images; "
            f"pick a divisor of {image_size}"
        )
    if DATASET_TASKS[dataset] == "reasoning":
        check_reasoning_config(cfg.dataset, cfg.model.max_positions)


def check_policy(cfg: Config) -> None:
    """The policy exists, every policy key set is one it uses, and its map fits the model."""
    policy = cfg.policy
    if policy.name not in POLICIES:
        raise BadInput(f"policy.name={policy.name!r} is not a policy; choose one of: {', '.join(POLICIES)}")
    spec = POLICIES[policy.name]
    for field in fields(PolicyConfig):
        key = field.name
        if key != "name" and key not in spec.keys and getattr(policy, key) != getattr(POLICY_DEFAULTS, key):
            uses = f"uses only policy.{', policy.'.join(spec.keys)}" if spec.keys else "has no keys to set"
            raise BadInput(f"policy={policy.name} does not use policy.{key}; it {uses}; drop the override")
    if policy.share_norms and policy.share == "block":
        raise BadInput("policy.share_norms=true needs policy.share=attention or policy.share=mlp; share=block "
                       "already shares the whole block, norms included")
    if policy.name == "from_file" and (policy.map is not None or policy.groups is not None):
        given_map(policy.path, policy.map, policy.groups, cfg.model.n_layer)
    if policy.name == "recursive":
        check_recursive(cfg)
    check_looped(cfg)
    if spec.pattern is not None:
        try:
            spec.pattern(cfg.model.n_layer, policy.n_sets)
        except ValueError as err:
            raise BadInput(f"policy={policy.name}: policy.n_sets={policy.n_sets} does not fit model.n_layer="
                           f"{cfg.model.n_layer}: {err}") from None


def _whole_number(key: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadInput(f"{key}={value!r} must be a whole number of at least {low}")


# Keys of policy=looped's prelude/core/coda form that the policy.counts form has no use for.
PLAN_ONLY = ("prelude", "core", "coda", "loops", "train_loops", "max_loops", "backprop_loops", "inject")


def check_looped(cfg: Config) -> None:
    """policy=looped's layout fits model.n_layer, its loop counts are possible, and what each loop adds fits the rest
    (train.eval_loops asks for policy=looped's prelude/core/coda form)."""
    policy, n_layer, eval_loops = cfg.policy, cfg.model.n_layer, list(cfg.train.eval_loops)
    plan_form = policy.name == "looped" and policy.counts is None
    if eval_loops and not plan_form:
        raise BadInput("train.eval_loops scores a looped model at other loop counts; it needs policy=looped with "
                       "policy.prelude/core/coda/loops (not policy.counts) - drop it for this policy")
    if policy.name != "looped":
        return
    if policy.counts is not None:
        if not isinstance(policy.counts, (list, tuple)):
            raise BadInput(f"policy.counts={policy.counts!r} must be a list of repeat counts, one per layer, e.g. "
                           f"[4,2,1,1]")
        counts = list(policy.counts)
        for count in counts:
            _whole_number("policy.counts entry", count, 1)
        if sum(counts) != n_layer:
            raise BadInput(f"policy.counts={counts} runs {sum(counts)} layer slots but model.n_layer={n_layer}; set "
                           f"model.n_layer={sum(counts)}")
        for key in PLAN_ONLY:
            if getattr(policy, key) != getattr(POLICY_DEFAULTS, key):
                raise BadInput(f"policy.counts runs each layer a fixed number of times; policy.{key} belongs to the "
                               f"policy.prelude/core/coda/loops form - drop one of the two")
    else:
        for key, low in (("prelude", 0), ("core", 1), ("coda", 0), ("loops", 1)):
            _whole_number(f"policy.{key}", getattr(policy, key), low)
        slots = policy.prelude + policy.core * policy.loops + policy.coda
        if slots != n_layer:
            raise BadInput(f"policy=looped: policy.prelude + policy.core * policy.loops + policy.coda = "
                           f"{policy.prelude} + {policy.core}*{policy.loops} + {policy.coda} = {slots} slots but "
                           f"model.n_layer={n_layer}; set model.n_layer={slots}")
        check_loop_counts(cfg)
    check_loop_params(cfg)


def check_loop_counts(cfg: Config) -> None:
    """policy.max_loops, train.eval_loops and policy.backprop_loops are possible together."""
    policy = cfg.policy
    if policy.max_loops is not None:
        _whole_number("policy.max_loops", policy.max_loops, policy.loops)
    cap = max_loops(policy)
    for loops in cfg.train.eval_loops:
        _whole_number("train.eval_loops entry", loops, 1)
        if policy.max_loops is not None and loops > cap:
            raise BadInput(f"train.eval_loops asks for {loops} loops, beyond policy.max_loops={cap}; raise "
                           f"policy.max_loops or drop {loops}")
    if policy.backprop_loops is not None:
        _whole_number("policy.backprop_loops", policy.backprop_loops, 1)
        if policy.backprop_loops > policy.loops:
            raise BadInput(f"policy.backprop_loops={policy.backprop_loops} exceeds policy.loops={policy.loops}; "
                           f"backpropagate through at most the {policy.loops} loops (or null: all)")
        if policy.grad != "shared":
            raise BadInput("policy.backprop_loops truncates the gradient a shared block sums over its loops; it "
                           "needs policy.grad=shared")


def check_loop_params(cfg: Config) -> None:
    """loop_params=lora has a rank that fits the matrices (and only it takes one); adaln and lora have a repeated slot
    to give their tensors to, scale a loop plan; hardware=fsdp shards whole blocks, so it takes no per-loop tensors and
    no injection."""
    policy = cfg.policy
    if policy.loop_params == "scale" and policy.counts is not None:
        raise BadInput("policy.loop_params=scale scales each loop of the core; policy.counts has no core loop - use "
                       "policy.prelude/core/coda/loops, or policy.loop_params=adaln|lora")
    if policy.loop_params in ("adaln", "lora") and not later_loop_slots(policy):
        raise BadInput(f"policy.loop_params={policy.loop_params} gives every later loop its own tensors, but this "
                       f"layout repeats no block; raise policy.loops (or a policy.counts entry) or drop it")
    if policy.loop_params == "lora":
        if policy.lora_rank == 0:
            raise BadInput("policy.loop_params=lora needs a rank: set policy.lora_rank (e.g. 4)")
        _whole_number("policy.lora_rank", policy.lora_rank, 1)
        if policy.lora_rank > cfg.model.d_model:
            raise BadInput(f"policy.lora_rank={policy.lora_rank} exceeds the full rank {cfg.model.d_model} "
                           f"(model.d_model)")
    elif policy.lora_rank != POLICY_DEFAULTS.lora_rank or policy.lora_alpha != POLICY_DEFAULTS.lora_alpha:
        raise BadInput("policy.lora_rank and policy.lora_alpha size policy.loop_params=lora's corrections; set "
                       "policy.loop_params=lora or drop them")
    if cfg.hardware.fsdp and (policy.inject != "none" or policy.loop_params != "none"):
        raise BadInput("hardware=fsdp shards whole blocks; policy.inject and policy.loop_params add tensors beside "
                       "them - use hardware=ddp for them")


def check_tied_lr(cfg: Config) -> None:
    """train.tied_lr corrects the sum of gradients over the slots that share a tensor, which only grad=shared takes."""
    if cfg.train.tied_lr != "none" and cfg.policy.grad == "frozen_copy":
        raise BadInput(f"train.tied_lr={cfg.train.tied_lr} needs policy.grad=shared: under policy.grad=frozen_copy a "
                       f"root learns from its own position only, so there is no sum over slots to correct; "
                       f"set policy.grad=shared or train.tied_lr=none")


def check_recursive(cfg: Config) -> None:
    """policy=recursive converts train.init_from; its rank fits the model's matrices and n_sets its pattern
    (the source itself is checked once it is found, in tyingrun.train.recursive.check_source)."""
    policy = cfg.policy
    if not cfg.train.init_from:
        raise BadInput("policy=recursive converts a trained model; set train.init_from= a finished run, a checkpoint "
                       "or a Hugging Face GPT-2, Llama or Qwen3 folder")
    if cfg.model.name not in ("gpt2", "llama"):
        raise BadInput(f"policy=recursive converts GPT-2 and Llama models, not model={cfg.model.name}")
    if isinstance(policy.lora_rank, bool) or not isinstance(policy.lora_rank, int) or not (
            0 <= policy.lora_rank <= cfg.model.d_model):
        raise BadInput(f"policy.lora_rank={policy.lora_rank!r} must be an integer from 0 (strict tying) to the full "
                       f"rank {cfg.model.d_model} (model.d_model)")
    try:
        recursive_map(policy, cfg.model.n_layer)
    except ValueError as err:
        raise BadInput(f"policy=recursive: policy.pattern={policy.pattern} cannot use policy.n_sets={policy.n_sets} "
                       f"with model.n_layer={cfg.model.n_layer}: {err}") from None
