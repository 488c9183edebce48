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

POLICY_DEFAULTS = PolicyConfig()


def preflight(cfg: Config, world_size: int = 1) -> None:
    """Raise BadInput, naming the key and the fix, for the first problem of ``cfg``."""
    config_module.check(cfg)
    check_model_and_dataset(cfg)
    check_policy(cfg)
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
    if spec.pattern is not None:
        try:
            spec.pattern(cfg.model.n_layer, policy.n_sets)
        except ValueError as err:
            raise BadInput(f"policy={policy.name}: policy.n_sets={policy.n_sets} does not fit model.n_layer="
                           f"{cfg.model.n_layer}: {err}") from None


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
