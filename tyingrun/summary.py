"""``summary.json``: every key a completed run's summary may hold, with its type (docs/run-folder.md says what
each one means). The writer (tyingrun.train.summary), the report and the tests read the keys from here.

Neutral and cheap: it imports nothing, so the report reads summaries without torch. (No ``from __future__ import
annotations`` here: TypedDict reads NotRequired from the evaluated annotations.)
"""

from typing import Any, Dict, FrozenSet, List, Optional

from typing_extensions import NotRequired, TypedDict, get_type_hints


class Summary(TypedDict):
    """Written once, atomically, when a run completes. Keys marked NotRequired appear where they apply: the
    quality and item keys of the model's task, the diagnostics of learned policies, policy=recursive's conversion."""

    # what ran
    status: str
    model: str
    dataset: str
    policy: str
    grad_mode: str
    steps: int
    n_layer: int
    total_params: int
    # the final evaluation, over the whole val and test splits
    val_loss: float
    val_ppl: NotRequired[float]  # language models
    val_acc: NotRequired[float]  # image classifiers; reasoning tasks: the whole answer right
    val_token_acc: NotRequired[float]  # reasoning tasks
    val_acc_by_difficulty: NotRequired[Dict[str, float]]  # reasoning tasks
    val_tokens: NotRequired[int]
    val_samples: NotRequired[int]
    test_loss: float
    test_ppl: NotRequired[float]
    test_acc: NotRequired[float]
    test_token_acc: NotRequired[float]
    test_acc_by_difficulty: NotRequired[Dict[str, float]]
    test_tokens: NotRequired[int]
    test_samples: NotRequired[int]
    # the map the run ends with, and what it trains
    final_map: List[int]
    final_trainable: List[bool]
    trainable_params: int
    stored_params: int
    independent_layers: int
    trainable_layers: int
    trainable_params_mean: float
    independent_layers_mean: float
    trainable_layers_mean: float
    optimizer_params: int
    # memory (tyingrun.metrics.memory says which figure to compare when) and compute
    train_state_bytes: int
    train_state_bytes_per_rank: List[int]
    train_state_bytes_total: int
    unique_blocks: int
    train_flops_per_token: int
    peak_tensor_bytes: int
    peak_state_bytes: int
    peak_other_bytes: int
    wall_time_s: float
    tokens_per_s: NotRequired[float]
    samples_per_s: NotRequired[float]
    mfu: Optional[float]  # null on the CPU and on a device of unknown peak without hardware.peak_flops
    # hardware.compile=true: graphs compiled, and those compiled again, per region ("block:<class>", "loss"); else null
    compile_graphs: Optional[Dict[str, int]]
    compile_recompiles: Optional[Dict[str, int]]
    # learned policies (random, dynamic_q, bandit)
    decisions: NotRequired[int]
    final_epsilon: NotRequired[float]  # dynamic_q
    clipped_reward_fraction: NotRequired[float]  # dynamic_q, bandit
    q_spread_min: NotRequired[float]
    q_spread_mean: NotRequired[float]
    greedy_fraction_last20: NotRequired[Optional[float]]
    greedy_map_stability: NotRequired[Optional[float]]
    # policy=looped: the layout (its keys and the resolved max_loops), the loops val_* and test_* were scored at, the
    # mean loops per training step, the training FLOPs per token at each evaluated loop count, and (train.eval_loops)
    # the test metrics at each loop count, keyed by the count
    looped: NotRequired[Dict[str, Any]]
    loops: NotRequired[int]
    train_loops_mean: NotRequired[float]
    train_flops_per_token_by_loops: NotRequired[Dict[str, int]]
    test_loss_by_loops: NotRequired[Dict[str, float]]
    test_ppl_by_loops: NotRequired[Dict[str, float]]
    test_acc_by_loops: NotRequired[Dict[str, float]]
    test_token_acc_by_loops: NotRequired[Dict[str, float]]
    test_acc_by_difficulty_by_loops: NotRequired[Dict[str, Dict[str, float]]]
    # policy=recursive: the conversion and the losses before any training step
    conversion: NotRequired[Dict[str, Any]]
    source_val_loss: NotRequired[float]
    source_test_loss: NotRequired[float]
    converted_val_loss: NotRequired[float]
    converted_test_loss: NotRequired[float]
    # the device's own figure
    peak_memory_bytes: int
    peak_memory_kind: str
    seed: int


SUMMARY_KEYS: FrozenSet[str] = frozenset(Summary.__annotations__)
REQUIRED_KEYS: FrozenSet[str] = Summary.__required_keys__
# The keys whose values are numbers (a non-finite one is written as null).
NUMBER_KEYS: FrozenSet[str] = frozenset(key for key, hint in get_type_hints(Summary).items() if hint in (int, float))
