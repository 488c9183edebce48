"""``make ablations``: the paper's ablations (METHOD.md §6) as Hydra sweeps over seeds, then the report.

Stage 1 sweeps every arm that needs nothing from another run. Stage 2 sweeps the arms built from what
dynamic_q learned in stage 1: (i) a conventional model with as many layers as dynamic_q kept independent,
(ii) dynamic_q's learned map retrained from scratch, and (vii) Takase's patterns with that many unique
layers. Each arm is one ``tyingrun -m ... train.seed=...`` into ``<out>/<NN>_<arm>``; the report covers ``<out>``.

    python -m tyingrun.ablations [--scale cpu|paper] [--seeds 0,1,2] [--out DIR] [override ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tyingrun.report import write_report

STAGE_1: Dict[str, List[str]] = {
    "none": ["policy=none"],
    "dynamic_q": ["policy=dynamic_q"],
    "dynamic_q_no_freeze": ["policy=dynamic_q", "policy.freeze_at_init=false"],  # (vi)
    "dynamic_q_neg_loss": ["policy=dynamic_q", "policy.reward=neg_loss"],
    "dynamic_q_k10": ["policy=dynamic_q", "policy.steps_per_decision=10"],
    "dynamic_q_shared_grad": ["policy=dynamic_q", "policy.grad=shared"],
    "random": ["policy=random"],
}


def stage_2(n_layer: int, kept: int, learned_map: Path) -> Dict[str, List[str]]:
    """The arms that copy dynamic_q's outcome: ``kept`` independent layers out of ``n_layer``, its best map."""
    sequential_sets = max(n for n in range(1, kept + 1) if n_layer % n == 0)
    return {
        "none_as_many_layers": ["policy=none", f"model.n_layer={kept}"],  # (i)
        "from_file_learned_map": ["policy=from_file", f"policy.path={hydra_string(str(learned_map))}"],  # (ii)
        "cyclic": ["policy=cyclic", f"policy.n_sets={kept}"],  # (vii)
        "sequential": ["policy=sequential", f"policy.n_sets={sequential_sets}"],
        "cycle_rev": ["policy=cycle_rev", f"policy.n_sets={max(1, min(kept, n_layer // 2))}"],
    }


def hydra_string(text: str) -> str:
    """``text`` as a Hydra override value: quoted unless it is plain (a path of letters, digits, _ . / -)."""
    if re.fullmatch(r"[\w./-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dynamic_q_outcome(arm_dir: Path) -> Optional[Tuple[int, int, Path]]:
    """(layers, independent layers at the end rounded over seeds, the best seed's summary) of the dynamic_q arm."""
    summaries = {path: json.loads(path.read_text()) for path in sorted(arm_dir.glob("*/summary.json"))}
    if not summaries:
        return None
    kept = round(statistics.fmean(s["independent_layers"] for s in summaries.values()))
    best = min(summaries, key=lambda path: summaries[path]["val_loss"])
    return summaries[best]["n_layer"], kept, best


def sweep(arm_dir: Path, arm: str, overrides: List[str]) -> int:
    command = [sys.executable, "-m", "tyingrun.cli", "-m", *overrides, f"hydra.sweep.dir={hydra_string(str(arm_dir))}"]
    print(f"\n== {arm}: tyingrun {shlex.join(command[3:])}", flush=True)
    return subprocess.run(command).returncode


def run_stage(out_dir: Path, arms: Dict[str, List[str]], first_index: int, common: List[str], seeds: str) -> List[str]:
    """Sweep each arm over ``seeds`` into a numbered folder (the report keeps the study's order); the failed arms."""
    failed = []
    for index, (arm, specific) in enumerate(arms.items(), first_index):
        # The arm's own keys come after the common ones, so they win (stage 2's layer count above all).
        if sweep(out_dir / f"{index:02d}_{arm}", arm, [*common, *specific, f"train.seed={seeds}"]):
            failed.append(arm)
    return failed


def run_ablations(scale: str, seeds: str, out_dir: Path, extra: List[str]) -> int:
    """Both stages and the report; returns 0 when every job finished, 1 otherwise."""
    common = [f"+experiment=ablation_{scale}", *extra]
    failed = run_stage(out_dir, STAGE_1, 1, common, seeds)
    outcome = dynamic_q_outcome(out_dir / f"{list(STAGE_1).index('dynamic_q') + 1:02d}_dynamic_q")
    if outcome is None:
        print("no dynamic_q run finished: skipping the arms built from its outcome (i, ii, vii)", file=sys.stderr)
        failed.append("stage 2")
    else:
        n_layer, kept, learned_map = outcome
        print(f"\ndynamic_q kept {kept} of {n_layer} layers independent; best map: {learned_map}", flush=True)
        failed += run_stage(out_dir, stage_2(n_layer, kept, learned_map), len(STAGE_1) + 1, common, seeds)
    write_report([out_dir])
    if failed:
        print(f"ablations: jobs failed in {', '.join(failed)} (see above and {out_dir / 'report.md'})",
              file=sys.stderr)
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tyingrun.ablations", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=("cpu", "paper"), default="cpu",
                        help="cpu: 8x128 GPT-2 on pydoc (~30 min on 2 cores); paper: 48x1600 on WikiText-2 (GPUs)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated (default 0,1,2)")
    parser.add_argument("--out", type=Path, help="default: outputs/ablations/<scale>-<date>_<time>")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.max_steps=20")
    args = parser.parse_args(argv)
    out_dir = args.out or Path("outputs/ablations") / f"{args.scale}-{datetime.now():%Y-%m-%d_%H-%M-%S}"
    sys.exit(run_ablations(args.scale, args.seeds, out_dir.resolve(), args.overrides))


if __name__ == "__main__":
    main()
