"""``make ablations``: the paper's ablations (docs/studies.md#ablations) as Hydra sweeps over seeds, then
the report.

Stage 1 sweeps every arm that needs nothing from another run. Stage 2 sweeps the arms built from what
dynamic_q learned in stage 1: (i) a conventional model with as many layers as dynamic_q kept independent,
(ii) dynamic_q's learned map (the seed with the best validation loss) retrained from scratch, and (vii)
Takase's patterns with that many unique layers. Every arm compared with dynamic_q trains with its gradient
mode (frozen_copy) unless the arm is about the gradient mode, and every arm is reported on the test split.
Each arm runs once per seed, ``tyingrun ... train.seed=<seed>`` into ``<out>/<NN>_<arm>/<seed>`` (the same runs as
the arm's sweep ``tyingrun -m ... train.seed=0,1,2``), several at a time on CPU; ``<out>/ablation_arms.json``
records each arm's exact overrides, and the report covers ``<out>``.

``--scale learn`` is another study on the same machinery (docs/studies.md#the-learning-study): whether a learned
tying policy learns at all within a single-machine budget. Stage 1: none, dynamic_q as published, dynamic_q with
the learning options, a per-layer bandit and the random control; stage 2: the fixed maps (the learned map from
file, cyclic, sequential) at as many independent layers as the learning-option dynamic_q kept.

``--scale reasoning`` is the looped-depth study on generated reasoning tasks (docs/studies.md#the-reasoning-study): one
stage of k⊗1, k⊗L and kL⊗1 on p-hop induction and on n-ary addition, every arm at the same steps.

``--scale loops`` is what one loop is worth (docs/studies.md#the-loops-study): one stage, on p-hop induction and on
pydoc, of untied models of 1, 2, 4 and 8 layers and of policy=looped models of 8 slots (1 + 2x3 + 1) with fixed loops,
sampled loops, input injection and per-loop scales, each looped arm scored at several loop counts.

``--scale recursive`` is the recursive-conversion study (docs/studies.md#the-conversion-study): stage 1 trains the
parent; stage 2 converts each seed's parent into half as many unique blocks under every ``policy.init`` with and
without LoRA and continues training each for the parent's steps, beside the parent continued for those steps and a
model with as many layers as unique blocks trained from scratch for both spans together.

    python -m tyingrun.ablations [--scale cpu|paper|learn|recursive|reasoning|loops] [--seeds 0,1,2] [--jobs N]
                                 [--out DIR] [override ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

from omegaconf.errors import OmegaConfBaseException

from tyingrun.config import CHOICES
from tyingrun.errors import BadInput, fail
from tyingrun.files import ARMS_FILE, SUMMARY_FILE, read_json, write_json_atomic
from tyingrun.overrides import hydra_value
from tyingrun.report import write_report

# dynamic_q's gradient mode: the fixed maps it is compared with train with it too (the paper's ablation code
# used frozen copies), so an arm differs from dynamic_q only in who chose the map.
MATCHED_GRAD = "policy.grad=frozen_copy"

STAGE_1: Dict[str, List[str]] = {
    "none": ["policy=none"],
    "dynamic_q": ["policy=dynamic_q"],
    "dynamic_q_no_freeze": ["policy=dynamic_q", "policy.freeze_at_init=false"],  # (vi)
    "dynamic_q_neg_loss": ["policy=dynamic_q", "policy.reward=neg_loss"],
    "dynamic_q_k10": ["policy=dynamic_q", "policy.steps_per_decision=10"],
    "dynamic_q_shared_grad": ["policy=dynamic_q", "policy.grad=shared"],  # the arm about the gradient mode
    "random": ["policy=random"],
}

Arms = Dict[str, Tuple[List[str], str]]  # arm -> (its own overrides, a note for the report)

# The learning study (--scale learn, +experiment=dlt_learning). Its learned arms decide every 2 steps (the preset
# cannot set the key: fixed policies refuse it); the learning-option arm is the published agent plus every option of
# docs/method.md#learning-options, chosen on the stub environment of tests/test_learning_options.py (where it finds
# the map the reward favours) and a one-seed pilot by validation loss and the learning diagnostics. Two more arms
# change only its reward: to a level reward (neg_loss), and back to the paper's (the control: no signal to learn).
LEARN_K = "policy.steps_per_decision=2"
PAIRED_REWARD = "policy.reward=paired_improvement"
NORMALISED_REWARD = "policy.reward_normalization=true"
LEARNED_REWARD = [PAIRED_REWARD, NORMALISED_REWARD]
LEARNING_OPTIONS = [
    NORMALISED_REWARD, "policy.epsilon_schedule=decision", "policy.epsilon_decay_per_decision=0.985",
    "policy.td_target=next_decision", "policy.replay=256", "policy.target_update=20", "policy.q_lr_decay_updates=20",
]


def learning_arm(reward: str) -> List[str]:
    """dynamic_q at the study's K with every learning option, on ``reward``."""
    return ["policy=dynamic_q", LEARN_K, f"policy.reward={reward}", *LEARNING_OPTIONS]


LEARN_STAGE_1: Arms = {
    "none": (["policy=none"], "conventional training: the reference"),
    "dynamic_q": (["policy=dynamic_q", LEARN_K], "dynamic_q as published (paper reward, epsilon per episode, one "
                                                 "same-layer TD update per decision)"),
    "dynamic_q_learning": (learning_arm("paired_improvement"),
                           "dynamic_q with every learning option: paired reward, normalised, epsilon per decision, "
                           "next-decision TD target, replay, a target network and a decaying learning rate"),
    "dynamic_q_learning_neg_loss": (learning_arm("neg_loss"),
                                    "every learning option, but the reward is the level -CE after the K steps "
                                    "(normalised) instead of the paired improvement"),
    "dynamic_q_learning_paper_reward": (learning_arm("paper"),
                                        "every learning option on the paper's clipped reward: the control, a "
                                        "reward with nothing to learn from at this scale"),
    "bandit": (["policy=bandit", LEARN_K, *LEARNED_REWARD],
               "one UCB1 bandit per layer on the same rewards: no bootstrapping, no state"),
    "random": (["policy=random", LEARN_K, PAIRED_REWARD],
               "the same schedule with uniformly random actions: the no-learning control; it ignores its rewards (the "
               "learners' paired reward), whose separation shows whether that reward tells the actions apart at all"),
}


# The conversion study (--scale recursive, +experiment=recursive_cpu, which names each run's folder by its seed, so a
# conversion reads the parent of its own seed): every policy.init, strict (rank 0) and relaxed by LoRA of this rank.
RECURSIVE_RANKS = (0, 8)
RECURSIVE_STAGE_1: Arms = {"parent": (["policy=none"], "the parent: the source model, conventional training")}


# The reasoning study (--scale reasoning, +experiment=reasoning_cpu; docs/studies.md#the-reasoning-study), in the
# k⊗L notation of Saunshi et al. (ICLR 2025): k⊗1 (k layers), k⊗L (k blocks looped L times: cyclic over kL slots)
# and kL⊗1 (kL layers), on each task, at the same steps, batch and width.
REASONING_TASKS = ("phop", "addition")
REASONING_K, REASONING_L = 1, 4


def reasoning_arms(k: int = REASONING_K, loops: int = REASONING_L) -> Arms:
    arms: Arms = {}
    for task in REASONING_TASKS:
        arms[f"{task}_{k}x1"] = ([f"dataset={task}", "policy=none", f"model.n_layer={k}"],
                                 f"{k}⊗1: {k} layer(s)")
        arms[f"{task}_{k}x{loops}"] = (
            [f"dataset={task}", "policy=cyclic", f"policy.n_sets={k}", f"model.n_layer={k * loops}"],
            f"{k}⊗{loops}: {k} block(s) looped {loops} times (cyclic, {k} set(s) over {k * loops} slots)")
        arms[f"{task}_{k * loops}x1"] = ([f"dataset={task}", "policy=none", f"model.n_layer={k * loops}"],
                                         f"{k * loops}⊗1: {k * loops} layers, the reference")
    return arms


# The loops study (--scale loops, +experiment=loops_cpu; docs/studies.md#the-loops-study): on each task, untied models
# of several depths (the curve that prices a loop: docs/method.md#what-one-loop-is-worth) and looped models of the
# deepest one's depth, prelude + core x loops + coda, each differing from the fixed-loop arm in one knob and each
# scored at every loop count of LOOPS_EVAL (untied models refuse train.eval_loops). Each task's arms share every other
# setting; pydoc's budget is its own (the preset's is phop's): more, smaller steps, at which depth pays sooner.
LOOPS_TASKS: Dict[str, List[str]] = {"phop": ["dataset=phop"],
                                     "pydoc": ["dataset=pydoc", "train.batch_size=16", "train.max_steps=1200"]}
LOOPS_DEPTHS = (1, 2, 4, 8)
LOOPS_LAYOUT = {"prelude": 1, "core": 2, "loops": 3, "coda": 1}
LOOPS_EVAL = (1, 2, 3, 4, 6)
LOOPED_VARIANTS: Dict[str, Tuple[List[str], str]] = {
    "fixed": ([], "the same loop count at every training step"),
    "poisson": (["policy.train_loops=poisson"], "loop counts drawn per training step (log-normal-Poisson, mean 3)"),
    "inject": (["policy.inject=add"], "fixed loops, the prelude's output added to the core's input at every loop"),
    "scale": (["policy.loop_params=scale"], "fixed loops, a learned per-loop output scale (initialised at 1)"),
}


def loops_arms(depths: Tuple[int, ...] = LOOPS_DEPTHS, layout: Optional[Dict[str, int]] = None) -> Arms:
    """Per task: an untied arm at each of ``depths``, then each looped variant at ``layout`` (its depth
    prelude + core * loops + coda)."""
    layout = layout or LOOPS_LAYOUT
    n_layer = layout["prelude"] + layout["core"] * layout["loops"] + layout["coda"]
    shape = (f"{layout['prelude']}+{layout['core']}x{layout['loops']}+{layout['coda']}: {n_layer} slots, "
             f"{layout['prelude'] + layout['core'] + layout['coda']} unique blocks")
    arms: Arms = {}
    for task, dataset in LOOPS_TASKS.items():
        for depth in depths:
            arms[f"{task}_untied_{depth}"] = ([*dataset, "policy=none", f"model.n_layer={depth}"],
                                              f"{depth} untied layer(s): a point of the depth curve")
        looped = [*dataset, "policy=looped", f"model.n_layer={n_layer}",
                  *(f"policy.{key}={value}" for key, value in layout.items()),
                  f"train.eval_loops=[{','.join(map(str, LOOPS_EVAL))}]"]
        for variant, (knobs, note) in LOOPED_VARIANTS.items():
            arms[f"{task}_looped_{variant}"] = ([*looped, *knobs], f"{shape}; {note}")
    return arms


@dataclass(frozen=True)
class Outcome:
    """What stage 2 is built from: the source arm's folder, its layers, the independent layers it kept (the mean over
    seeds, rounded), its steps and the summary of its seed with the lowest validation loss."""

    arm_dir: Path
    n_layer: int
    kept: int
    steps: int
    best: Path


def nearest(legal: List[int], wanted: int) -> int:
    """The legal count closest to ``wanted``; on a tie the smaller, so the pattern never gets the larger budget."""
    return min(legal, key=lambda n: (abs(n - wanted), n))


def independent_layer_note(pattern: str, used: int, kept: int, source: str = "dynamic_q") -> str:
    if used == kept:
        return f"{used} independent layers, as many as {source} kept"
    return f"{used} independent layers: the legal count nearest to the {kept} {source} kept ({pattern})"


def stage_2(n_layer: int, kept: int, learned_map: Path, source: str = "dynamic_q") -> Arms:
    """The arms that copy ``source``'s outcome: ``kept`` independent layers out of ``n_layer``, its best map."""
    sequential_sets = nearest([n for n in range(1, n_layer + 1) if n_layer % n == 0], kept)
    cycle_rev_sets = nearest(list(range(1, n_layer // 2 + 1)), kept)
    return {
        "none_as_many_layers": (["policy=none", f"model.n_layer={kept}"],  # (i)
                                f"a conventional model with the {kept} layers {source} kept independent"),
        "from_file_learned_map": (  # (ii)
            ["policy=from_file", f"policy.path={hydra_value(str(learned_map))}", MATCHED_GRAD],
            f"{source}'s final map from the seed with the lowest validation loss ({learned_map}), retrained"),
        "cyclic": (["policy=cyclic", f"policy.n_sets={kept}", MATCHED_GRAD],  # (vii)
                   independent_layer_note("any count up to n_layer", kept, kept, source)),
        "sequential": (["policy=sequential", f"policy.n_sets={sequential_sets}", MATCHED_GRAD],
                       independent_layer_note(f"n_sets must divide n_layer={n_layer}", sequential_sets, kept, source)),
        "cycle_rev": (["policy=cycle_rev", f"policy.n_sets={cycle_rev_sets}", MATCHED_GRAD],
                      independent_layer_note(f"n_sets can be at most n_layer/2={n_layer // 2}", cycle_rev_sets, kept,
                                             source)),
    }


def learn_stage_2(n_layer: int, kept: int, learned_map: Path) -> Arms:
    """The learning study's fixed maps at the learning-option dynamic_q's count: its best map, cyclic, sequential."""
    arms = stage_2(n_layer, kept, learned_map, source="dynamic_q_learning")
    return {arm: arms[arm] for arm in ("from_file_learned_map", "cyclic", "sequential")}


def recursive_stage_2(parent: Outcome) -> Arms:
    """Each seed's parent converted into half as many unique blocks under every init and rank, and the two controls."""
    blocks, steps = parent.n_layer // 2, parent.steps
    source = f"train.init_from={hydra_value(str(parent.arm_dir) + '/${train.seed}')}"
    arms: Arms = {
        "parent_continued": (["policy=none", source],
                             f"the parent trained {steps} more steps from its final weights, on a fresh schedule as "
                             f"every conversion"),
        "scratch": (["policy=none", f"model.n_layer={blocks}", f"train.max_steps={2 * steps}"],
                    f"a conventional model with as many layers as the converted models have unique blocks ({blocks}), "
                    f"trained from scratch for the parent's and the continuation's steps together"),
    }
    for rank in RECURSIVE_RANKS:
        for init in CHOICES["policy.init"]:
            relaxed = f"relaxed by LoRA of rank {rank}" if rank else "strictly tied"
            arms[f"recursive_{init}_r{rank}"] = (
                ["policy=recursive", f"policy.n_sets={blocks}", f"policy.init={init}", f"policy.lora_rank={rank}",
                 source],
                f"the parent converted into {blocks} unique blocks (cycle), initialised {init}, {relaxed}, then "
                f"trained {steps} steps")
    return arms


@dataclass(frozen=True)
class Study:
    """What ``--scale`` runs: the experiment preset, the stage-1 arms, the stage-1 arm whose outcome stage 2 copies,
    the stage-2 arms built from it, the default seeds, and whether each run gets one CPU thread (then the study runs
    as many at once as there are cores) or the whole machine (one run at a time)."""

    experiment: str
    stage_1: Arms
    source: Optional[str]  # None: a study of one stage
    stage_2: Optional[Callable[[Outcome], Arms]]
    seeds: str = "0,1,2"
    one_thread_per_run: bool = False
    # The report pairs arms of another budget with the reference (the recursive study's scratch arm trains for the
    # parent's and the continuation's steps together, by design).
    pairs_other_budgets: bool = False

    def default_jobs(self) -> int:
        return (os.cpu_count() or 1) if self.one_thread_per_run else 1

    def env(self) -> Dict[str, str]:
        return {"OMP_NUM_THREADS": "1"} if self.one_thread_per_run else {}


def _copying(build: Callable[[int, int, Path], Arms]) -> Callable[[Outcome], Arms]:
    """A stage 2 that copies the learned arm's budget and best map."""
    return lambda outcome: build(outcome.n_layer, outcome.kept, outcome.best)


PAPER_STAGE_1: Arms = {arm: (overrides, "") for arm, overrides in STAGE_1.items()}
# The CPU studies give each run one thread and run one per core: at these widths a second thread mostly waits on the
# first (per-operation overhead is as large as the arithmetic), so two one-thread runs finish well before two
# two-thread runs one after the other.
STUDIES = {
    "cpu": Study("ablation_cpu", PAPER_STAGE_1, "dynamic_q", _copying(stage_2), one_thread_per_run=True),
    "paper": Study("ablation_paper", PAPER_STAGE_1, "dynamic_q", _copying(stage_2)),
    "learn": Study("dlt_learning", LEARN_STAGE_1, "dynamic_q_learning", _copying(learn_stage_2),
                   one_thread_per_run=True),
    "recursive": Study("recursive_cpu", RECURSIVE_STAGE_1, "parent", recursive_stage_2, seeds="0,1",
                       one_thread_per_run=True, pairs_other_budgets=True),
    "reasoning": Study("reasoning_cpu", reasoning_arms(), None, None, one_thread_per_run=True),
    "loops": Study("loops_cpu", loops_arms(), None, None, one_thread_per_run=True),
}


def arm_outcome(arm_dir: Path) -> Optional[Outcome]:
    """What a finished stage-1 arm ended with, over its seeds (None when no seed finished)."""
    summaries = {path: read_json(path) for path in sorted(arm_dir.glob(f"*/{SUMMARY_FILE}"))}
    if not summaries:
        return None
    kept = round(statistics.fmean(s["independent_layers"] for s in summaries.values()))
    best = min(summaries, key=lambda path: summaries[path]["val_loss"])
    return Outcome(arm_dir, summaries[best]["n_layer"], kept, summaries[best]["steps"], best)


# A run's exit status after SIGINT (Ctrl-C) or SIGTERM: the study is being stopped, so no further run starts.
STOPPED_BY_SIGNAL = (130, 143)


@dataclass(frozen=True)
class Job:
    """One arm at one seed: ``tyingrun <overrides> train.seed=<seed>`` into ``<arm folder>/<seed>``."""

    arm: str
    folder: str
    overrides: List[str]
    seed: str

    def command(self, out_dir: Path) -> List[str]:
        run_dir = hydra_value(str(out_dir / self.folder / self.seed))
        return [sys.executable, "-m", "tyingrun.cli", *self.overrides, f"train.seed={self.seed}",
                f"hydra.run.dir={run_dir}"]

    def log_path(self, out_dir: Path) -> Path:
        return out_dir / "logs" / f"{self.folder}_seed{self.seed}.log"


def run_job(job: Job, out_dir: Path, env: Dict[str, str], to_log: bool) -> int:
    """Run one job, its output to the console or (when jobs run side by side) to its log file; its exit status."""
    environment = {**env, **os.environ} if env else None
    if not to_log:
        return subprocess.run(job.command(out_dir), env=environment).returncode
    job.log_path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    with job.log_path(out_dir).open("w") as log:
        return subprocess.run(job.command(out_dir), env=environment, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode


def record_arm(out_dir: Path, arm: str, folder: str, overrides: List[str], note: str) -> None:
    """Add the arm's exact overrides to ``<out>/ablation_arms.json``, which the report prints."""
    path = out_dir / ARMS_FILE
    recorded = read_json(path) if path.is_file() else {"arms": []}
    recorded["arms"].append({"arm": arm, "folder": folder, "overrides": overrides, "note": note})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, recorded)


def parse_seeds(seeds: str) -> List[str]:
    """The train.seed values of ``--seeds``; BadInput for one that is not an integer or is given twice (its jobs
    would run into one folder)."""
    values = [value.strip() for value in seeds.split(",")]
    for value in values:
        if not re.fullmatch(r"\d+", value):
            raise BadInput(f"--seeds {seeds}: {value!r} is not a seed; give train.seed values like 0,1,2")
    repeated = sorted({int(value) for value in values if [int(v) for v in values].count(int(value)) > 1})
    if repeated:
        raise BadInput(f"--seeds {seeds} gives seed {repeated[0]} twice: its jobs would run into one folder; give "
                       f"each seed once")
    return values


def check_arms(arms: Arms, common: List[str], seed: str) -> None:
    """Compose every arm's config as its jobs will (typed, every check of the preflight) before any job starts;
    BadInput naming the first arm that cannot run."""
    # Here, not at the top: the data tool imports torch, which the driver's start (and --help) does without.
    from tyingrun.cli import CONFIG_ERRORS, explain
    from tyingrun.data_cli import compose_config

    for arm, (specific, _) in arms.items():
        try:
            compose_config([*common, *specific, f"train.seed={seed}"])
        except BadInput as err:
            raise BadInput(f"arm {arm}: {err}") from None
        except (*CONFIG_ERRORS, OmegaConfBaseException) as err:
            raise BadInput(f"arm {arm}: {explain(err)}") from None


def run_stage(out_dir: Path, arms: Arms, first_index: int, common: List[str], seeds: str, jobs: int,
              env: Dict[str, str]) -> List[str]:
    """Run each arm at each of ``seeds`` into a numbered folder (the report keeps the study's order), ``jobs`` runs
    at a time; the arms that had a failed run. The seeds and every arm's config are checked before any job starts."""
    seed_values = parse_seeds(seeds)
    check_arms(arms, common, seed_values[0])
    queue = []
    for index, (arm, (specific, note)) in enumerate(arms.items(), first_index):
        # The arm's own keys come after the common ones, so they win (stage 2's layer count above all).
        overrides = [*common, *specific]
        folder = f"{index:02d}_{arm}"
        record_arm(out_dir, arm, folder, [*overrides, f"train.seed={seeds}"], note)
        queue += [Job(arm, folder, overrides, seed) for seed in seed_values]
    failed: Set[str] = set()
    side_by_side = jobs > 1
    stopping = threading.Event()

    def run(job: Job) -> None:
        if stopping.is_set():
            return
        print(f"\n== {job.arm}, seed {job.seed}: tyingrun {shlex.join(job.command(out_dir)[3:])}", flush=True)
        started = time.monotonic()
        status = run_job(job, out_dir, env, to_log=side_by_side)
        if status in STOPPED_BY_SIGNAL:
            stopping.set()
        if status:
            failed.add(job.arm)
        where = f"; its output: {job.log_path(out_dir)}" if side_by_side else ""
        outcome = f"failed (exit {status})" if status else "done"
        print(f"== {job.arm}, seed {job.seed}: {outcome} in {time.monotonic() - started:.0f} s{where}", flush=True)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        list(pool.map(run, queue))
    finally:  # on a stop signal, start no further job; the running ones stop on the same signal
        pool.shutdown(cancel_futures=True)
    return [arm for arm in arms if arm in failed]


def run_stage_2(study: Study, out_dir: Path, common: List[str], seeds: str, jobs: int) -> List[str]:
    """The arms built from the source arm's outcome (none for a study of one stage); what failed (all of stage 2 when
    no source run finished)."""
    source, stage_2 = study.source, study.stage_2
    if source is None or stage_2 is None:
        return []
    outcome = arm_outcome(out_dir / f"{list(study.stage_1).index(source) + 1:02d}_{source}")
    if outcome is None:
        print(f"no {source} run finished: skipping the arms built from its outcome", file=sys.stderr)
        return ["stage 2"]
    print(f"\n{source} kept {outcome.kept} of {outcome.n_layer} layers independent; best seed: {outcome.best}",
          flush=True)
    return run_stage(out_dir, stage_2(outcome), len(study.stage_1) + 1, common, seeds, jobs, study.env())


def run_ablations(scale: str, seeds: Optional[str], out_dir: Path, extra: List[str],
                  jobs: Optional[int] = None) -> int:
    """The study's stages and the report; returns 0 when every job finished, 1 otherwise. BadInput (before any job)
    for seeds or overrides that a stage's arms cannot run with."""
    study = STUDIES[scale]
    common = [f"+experiment={study.experiment}", *extra]
    seeds = seeds or study.seeds
    jobs = jobs or study.default_jobs()
    failed = run_stage(out_dir, study.stage_1, 1, common, seeds, jobs, study.env())
    failed += run_stage_2(study, out_dir, common, seeds, jobs)
    write_report([out_dir], pair_other_budgets=study.pairs_other_budgets)
    if failed:
        print(f"ablations: jobs failed in {', '.join(failed)} (see above and {out_dir / 'report.md'})",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tyingrun.ablations", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=tuple(STUDIES), default="cpu",
                        help="cpu: 8x128 GPT-2 on pydoc (~22 min on 2 cores); paper: 48x1600 on WikiText-2 (GPUs); "
                             "learn: the learning study, 6x64 GPT-2 on pydoc (~15 min on 2 cores); recursive: the "
                             "conversion study, an 8x128 GPT-2 parent on pydoc (~21 min on 2 cores); reasoning: "
                             "1⊗1, 1⊗4 and 4⊗1 GPT-2 of width 64 on p-hop and addition (docs/studies.md"
                             "#the-reasoning-study); loops: untied 1, 2, 4, 8 layers and looped 1+2x3+1 GPT-2 of width "
                             "64 on p-hop and pydoc (docs/studies.md#the-loops-study)")
    parser.add_argument("--seeds", help="train.seed values, comma-separated (default 0,1,2; recursive: 0,1)")
    parser.add_argument("--out", type=Path, help="default: outputs/ablations/<scale>-<date>_<time>")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: cpu, learn, recursive, reasoning, loops: "
                                                 "one per core, each with one thread, output in <out>/logs/; paper: 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: at least one run must run at a time; use --jobs 1 to run one at a time")
    out_dir = args.out or Path("outputs/ablations") / f"{args.scale}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    try:
        sys.exit(run_ablations(args.scale, args.seeds, out_dir.resolve(), args.overrides, args.jobs))
    except BadInput as err:
        fail(str(err), program="ablations")
    except KeyboardInterrupt:
        print(f"ablations: stopped; no further run was started, and each run that was under way stopped as a run "
              f"does (its folder in {out_dir} says how to resume it)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
