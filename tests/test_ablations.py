"""The ablation driver's second stage, its presets, and the Slurm launcher preset."""

import json

import pytest

from tyingrun.ablations import Outcome, arm_outcome, stage_2

from .helpers import compose


def test_stage_2_matches_dynamic_q_budget_and_gradient_mode(tmp_path):
    arms = stage_2(n_layer=8, kept=3, learned_map=tmp_path / "run 0" / "summary.json")
    overrides = {arm: specific for arm, (specific, _) in arms.items()}
    assert overrides["none_as_many_layers"] == ["policy=none", "model.n_layer=3"]
    assert overrides["cyclic"] == ["policy=cyclic", "policy.n_sets=3", "policy.grad=frozen_copy"]
    # 2 and 4 divide 8 and are equally near 3: the smaller, so the pattern never trains more than dynamic_q kept.
    assert overrides["sequential"] == ["policy=sequential", "policy.n_sets=2", "policy.grad=frozen_copy"]
    assert "nearest to the 3 dynamic_q kept" in arms["sequential"][1]
    assert overrides["cycle_rev"] == ["policy=cycle_rev", "policy.n_sets=3", "policy.grad=frozen_copy"]
    assert arms["cycle_rev"][1] == "3 independent layers, as many as dynamic_q kept"
    assert overrides["from_file_learned_map"] == [
        "policy=from_file", f"policy.path='{tmp_path}/run 0/summary.json'", "policy.grad=frozen_copy"]
    six = {arm: specific for arm, (specific, _) in stage_2(n_layer=8, kept=6, learned_map=tmp_path).items()}
    assert six["cycle_rev"][:2] == ["policy=cycle_rev", "policy.n_sets=4"]
    assert six["sequential"][:2] == ["policy=sequential", "policy.n_sets=4"]  # 4 and 8 are both 2 away from 6


def test_arm_outcome_rounds_the_mean_and_picks_the_best_map(tmp_path):
    for seed, (layers, loss) in enumerate(((2, 5.0), (3, 4.0), (3, 4.5))):
        (tmp_path / str(seed)).mkdir()
        summary = {"n_layer": 8, "independent_layers": layers, "val_loss": loss, "steps": 100}
        (tmp_path / str(seed) / "summary.json").write_text(json.dumps(summary))
    assert arm_outcome(tmp_path) == Outcome(tmp_path, 8, 3, 100, tmp_path / "1" / "summary.json")
    assert arm_outcome(tmp_path / "missing") is None


@pytest.mark.parametrize("scale, n_layer, dataset", [("cpu", 8, "pydoc"), ("paper", 48, "wiki2")])
def test_ablation_presets_compose(scale, n_layer, dataset):
    cfg = compose([f"+experiment=ablation_{scale}", "policy=dynamic_q"])
    assert cfg.model.n_layer == n_layer and cfg.dataset.name == dataset and cfg.policy.name == "dynamic_q"
    assert compose([f"+experiment=ablation_{scale}", "model.n_layer=3"]).model.n_layer == 3


def test_slurm_preset_never_resubmits():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'tyingrun[launchers]'")
    launcher = compose(["hydra/launcher=slurm"], return_hydra_config=True).hydra.launcher
    assert launcher.max_num_timeout == 0 and launcher.gpus_per_node == 1 and launcher.timeout_min > 0


def test_the_conversion_study_converts_each_seeds_parent_at_every_init_and_rank(tmp_path):
    from omegaconf import OmegaConf

    from tyingrun.ablations import RECURSIVE_STAGE_1, STUDIES, recursive_stage_2
    from tyingrun.config import CHOICES, Config
    from tyingrun.preflight import preflight

    study = STUDIES["recursive"]
    assert study.seeds == "0,1" and study.source == "parent" and list(RECURSIVE_STAGE_1) == ["parent"]
    parent_dir = tmp_path / "01_parent"
    arms = recursive_stage_2(Outcome(parent_dir, 8, 8, 100, parent_dir / "1" / "summary.json"))
    conversions = {arm: overrides for arm, (overrides, _) in arms.items() if arm.startswith("recursive_")}
    assert len(conversions) == len(CHOICES["policy.init"]) * 2
    for arm, (overrides, note) in {**RECURSIVE_STAGE_1, **arms}.items():
        hydra_cfg = compose([f"+experiment={study.experiment}", *overrides, "train.seed=1"], return_hydra_config=True)
        assert hydra_cfg.hydra.sweep.subdir == "1" and note
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                                  compose([f"+experiment={study.experiment}", *overrides,
                                                           "train.seed=1"])))
        preflight(cfg)
        if arm in conversions:
            # Seed 1's conversion reads seed 1's parent, into half as many unique blocks.
            assert cfg.train.init_from == str(parent_dir / "1") and cfg.policy.n_sets == 4
            assert f"policy.init={cfg.policy.init}" in overrides and cfg.policy.lora_rank in (0, 8)
        elif arm == "scratch":
            assert (cfg.model.n_layer, cfg.train.max_steps, cfg.train.init_from) == (4, 200, None)
        else:
            assert (cfg.model.n_layer, cfg.train.max_steps) == (8, 100)
    assert arms["parent_continued"][0][-1] == next(iter(conversions.values()))[-1]


def test_a_stage_runs_every_arm_at_every_seed_into_its_folder_jobs_at_a_time(tmp_path, monkeypatch):
    import threading

    from tyingrun import ablations

    started, pairs = [], threading.Barrier(2, timeout=10)

    def fake_run_job(job, out_dir, env, to_log):
        started.append((job.arm, job.seed, job.command(out_dir)[3:], to_log, env))
        pairs.wait()  # two jobs at a time, or this times out
        return 1 if (job.arm, job.seed) == ("b", "1") else 0

    monkeypatch.setattr(ablations, "run_job", fake_run_job)
    arms = {"a": (["policy=none"], "note a"), "b": (["policy=cyclic"], "note b")}
    failed = ablations.run_stage(tmp_path, arms, 3, ["+experiment=ablation_cpu"], "0,1", 2, {"OMP_NUM_THREADS": "1"})
    assert failed == ["b"]
    assert sorted((arm, seed) for arm, seed, *_ in started) == [("a", "0"), ("a", "1"), ("b", "0"), ("b", "1")]
    commands = {(arm, seed): command for arm, seed, command, *_ in started}
    assert commands["b", "1"] == ["+experiment=ablation_cpu", "policy=cyclic", "train.seed=1",
                                  f"hydra.run.dir={tmp_path}/04_b/1"]
    assert all(to_log and env == {"OMP_NUM_THREADS": "1"} for *_, to_log, env in started)
    recorded = json.loads((tmp_path / "ablation_arms.json").read_text())["arms"]
    assert [(arm["folder"], arm["overrides"][-1]) for arm in recorded] == [("03_a", "train.seed=0,1"),
                                                                           ("04_b", "train.seed=0,1")]


def test_a_stop_signal_starts_no_further_job(tmp_path, monkeypatch):
    import signal
    import time

    from tyingrun import ablations

    started = []

    def interrupted(job, out_dir, env, to_log):
        # Ctrl-C reaches the driver (its main thread) and the running child, which stops as a run does.
        started.append(job.seed)
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.5)
        return 130

    monkeypatch.setattr(ablations, "run_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ablations.run_stage(tmp_path, {"a": (["policy=none"], "")}, 1, [], "0,1,2", 1, {})
    assert started == ["0"]


def test_cpu_studies_run_one_single_thread_run_per_core(monkeypatch):
    from tyingrun.ablations import STUDIES

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    for scale in ("cpu", "learn", "recursive"):
        assert STUDIES[scale].default_jobs() == 2 and STUDIES[scale].env() == {"OMP_NUM_THREADS": "1"}
    assert STUDIES["paper"].default_jobs() == 1 and STUDIES["paper"].env() == {}
