"""tyingrun-report's learning diagnostics: the value spread, the greedy share and the greedy map's stability, with
their lowest seed, and the warning for an agent whose greedy map never settled."""

from .helpers import make_run, report, run_summary


def diagnostics(spread, stability, greedy=0.99):
    return {"decisions": 499, "final_epsilon": 0.01, "clipped_reward_fraction": 0.0, "q_spread_min": spread,
            "q_spread_mean": spread * 2, "greedy_fraction_last20": greedy, "greedy_map_stability": stability}


def test_learning_diagnostics_columns_and_the_unsettled_warning(tmp_path):
    root = tmp_path / "study"
    for seed, ppl in enumerate((100.0, 110.0, 120.0)):
        make_run(root / "none" / str(seed), seed, run_summary(ppl), name="none")
    for seed, (spread, stability) in enumerate(((0.8, 1.0), (0.5, 0.8), (0.6, 1.0))):
        make_run(root / "settled" / str(seed), seed, run_summary(95.0 + seed, **diagnostics(spread, stability)),
                 reward="paired_improvement")
    for seed, stability in enumerate((0.6, 0.2, 0.0)):
        make_run(root / "unsettled" / str(seed), seed, run_summary(99.0 + seed, **diagnostics(0.01, stability)),
                 reward="neg_loss")
    rows, markdown, printed = report(root, tmp_path / "out")

    settled = rows["dynamic_q policy.reward=paired_improvement"]
    assert float(settled["greedy_map_stability"]) == (1.0 + 0.8 + 1.0) / 3
    assert float(settled["greedy_map_stability_lowest"]) == 0.8 and float(settled["q_spread_min_lowest"]) == 0.5
    assert settled["learning_warning"] == ""
    assert "| 0.633 (lowest 0.5) | 1.27 | 99% | 93% (lowest 80%) |" in markdown

    unsettled = rows["dynamic_q policy.reward=neg_loss"]
    warning = ("warning: dynamic_q (gpt2/pydoc, policy.reward=neg_loss): no sign that the agent learned: its greedy "
               "map did not settle (on its worst seed only 0% of the layers kept their greedy action over the last "
               "episodes)")
    assert unsettled["learning_warning"] == warning and warning in printed.splitlines()
    assert "| dynamic_q ⚠ did not settle | policy.reward=neg_loss |" in markdown
    assert "| 27% (lowest 0%) ⚠ |" in markdown
    assert rows["none"]["greedy_map_stability"] == "" and rows["none"]["learning_warning"] == ""
