"""The loops study (--scale loops): untied arms of each depth and looped arms of the deepest one's depth on each task,
every arm composed through the CLI's checks before anything trains."""

from tyingrun.data_cli import compose_config


def test_each_task_has_the_untied_depths_and_the_looped_variants_at_one_layout():
    from tyingrun.ablations import LOOPS_TASKS, loops_arms

    arms = loops_arms(depths=(1, 3), layout={"prelude": 2, "core": 1, "loops": 4, "coda": 0})
    variants = ("fixed", "poisson", "inject", "scale")
    assert list(arms) == [name for task in LOOPS_TASKS for name in (
        f"{task}_untied_1", f"{task}_untied_3", *(f"{task}_looped_{variant}" for variant in variants))]
    assert arms["pydoc_untied_3"][0] == ["dataset=pydoc", "train.batch_size=16", "train.max_steps=1200", "policy=none",
                                         "model.n_layer=3"]
    looped = ["dataset=phop", "policy=looped", "model.n_layer=6", "policy.prelude=2", "policy.core=1",
              "policy.loops=4", "policy.coda=0", "train.eval_loops=[1,2,3,4,6]"]
    assert arms["phop_looped_fixed"][0] == looped
    assert arms["phop_looped_poisson"][0] == [*looped, "policy.train_loops=poisson"]
    assert arms["phop_looped_inject"][0] == [*looped, "policy.inject=add"]
    assert arms["phop_looped_scale"][0] == [*looped, "policy.loop_params=scale"]
    assert arms["phop_looped_fixed"][1].startswith("2+1x4+0: 6 slots, 3 unique blocks")


def test_every_arm_of_the_study_composes_and_passes_the_preflight():
    from tyingrun.ablations import STUDIES, check_arms

    study = STUDIES["loops"]
    assert study.source is None and study.stage_2 is None and study.one_thread_per_run and study.seeds == "0,1,2"
    check_arms(study.stage_1, [f"+experiment={study.experiment}"], "0")
    configs = {arm: compose_config([f"+experiment={study.experiment}", *overrides])
               for arm, (overrides, _) in study.stage_1.items()}
    assert len(configs) == 16
    for arm, cfg in configs.items():
        task = arm.split("_")[0]
        assert cfg.dataset.name == task and cfg.model.name == "gpt2" and cfg.model.d_model == 64
        if "_untied_" in arm:
            assert cfg.policy.name == "none" and cfg.model.n_layer == int(arm.rsplit("_", 1)[1])
            assert list(cfg.train.eval_loops) == []
        else:
            assert cfg.policy.name == "looped" and cfg.model.n_layer == 8
            assert (cfg.policy.prelude, cfg.policy.core, cfg.policy.loops, cfg.policy.coda) == (1, 2, 3, 1)
            assert list(cfg.train.eval_loops) == [1, 2, 3, 4, 6]
    # Within a task the arms differ only in the policy and the depth: the same data, steps, batch and schedule.
    for task in ("phop", "pydoc"):
        budgets = {(cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr, cfg.dataset.block_size,
                    tuple(cfg.dataset.test_hops or ())) for arm, cfg in configs.items() if arm.startswith(task)}
        assert len(budgets) == 1
    assert (configs["phop_untied_8"].train.max_steps, configs["phop_untied_8"].train.batch_size) == (1500, 32)
    assert (configs["pydoc_looped_scale"].train.max_steps, configs["pydoc_looped_scale"].train.batch_size) == (1200, 16)
    phop = configs["phop_untied_1"].dataset
    assert phop.hops == 1 and list(phop.test_hops) == [1, 2]
    variant = {arm: configs[f"phop_looped_{arm}"].policy for arm in ("fixed", "poisson", "inject", "scale")}
    assert [(p.train_loops, p.inject, p.loop_params) for p in variant.values()] == [
        ("fixed", "none", "none"), ("poisson", "none", "none"), ("fixed", "add", "none"), ("fixed", "none", "scale")]
