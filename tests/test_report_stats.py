"""The report's statistics on known numbers: t-intervals, paired differences against a reference group,
learning diagnostics, the fallback to val for summaries without a test split, and the ablation arms section."""

import csv
import json
import math

import pytest

from tyingrun.cli import report_main
from tyingrun.report import figure_metric
from tyingrun.report.runs import ARMS_FILE, find_runs, group_runs, reference_groups
from tyingrun.report.stats import estimate, paired_differences

from .helpers import make_run, report, run_summary

# t_{0.975, df} for df = 1, 2, 3 (tables of Student's t).
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


def test_t_interval_of_a_known_sample():
    found = estimate([1.0, 2.0, 3.0, 4.0])
    assert (found.n, found.mean) == (4, 2.5)
    assert found.std == pytest.approx(math.sqrt(5 / 3))
    assert found.halfwidth == pytest.approx(2.0542603, abs=1e-6)  # 3.1824463 * 1.2909944 / 2
    assert (found.low, found.high) == pytest.approx((2.5 - 2.0542603, 2.5 + 2.0542603), abs=1e-6)
    assert found.contains_zero is False
    assert estimate([-1.0, 2.0]).contains_zero is True


def test_one_value_has_no_std_and_no_interval():
    found = estimate([7.0])
    assert (found.n, found.mean, found.std, found.halfwidth, found.low, found.high) == (1, 7.0, None, None, None, None)
    assert found.contains_zero is None


def test_paired_differences_use_only_shared_keys_in_order():
    assert paired_differences({2: 5.0, 0: 1.0, 7: 9.0}, {0: 3.0, 2: 1.0, 3: 0.0}) == [-2.0, 4.0]
    assert paired_differences({0: 1.0}, {1: 1.0}) == []


@pytest.fixture()
def study(tmp_path):
    """none (seeds 0-2), cyclic (seeds 0-3: seed 3 has no partner), dynamic_q that could not learn (seeds 0-1)
    and dynamic_q with the neg_loss reward that could (seed 0)."""
    root = tmp_path / "study"
    for seed, ppl in enumerate((100.0, 110.0, 120.0)):
        make_run(root / "01_none" / str(seed), seed, run_summary(ppl), name="none")
    for seed, ppl in enumerate((90.0, 104.0, 111.0, 50.0)):
        make_run(root / "02_cyclic" / str(seed), seed, run_summary(ppl), name="cyclic")
    stuck = {"decisions": 12, "final_epsilon": 0.86, "clipped_reward_fraction": 1.0}
    for seed, ppl in enumerate((95.0, 118.0)):
        make_run(root / "03_dynamic_q" / str(seed), seed, run_summary(ppl, **stuck))
    learning = {"decisions": 400, "final_epsilon": 0.01, "clipped_reward_fraction": 0.0}
    make_run(root / "04_dynamic_q_neg_loss" / "0", 0, run_summary(99.0, **learning), reward="neg_loss")
    return root


def test_quality_columns_hold_the_t_interval_over_seeds(study, tmp_path):
    rows, markdown, _ = report(study, tmp_path / "out")
    none = rows["none"]
    halfwidth = T_975[2] * 10.0 / math.sqrt(3)
    assert int(none["seeds"]) == 3
    assert float(none["test_ppl_mean"]) == pytest.approx(110.0)
    assert float(none["test_ppl_std"]) == pytest.approx(10.0)
    assert float(none["test_ppl_ci_low"]) == pytest.approx(110.0 - halfwidth)
    assert float(none["test_ppl_ci_high"]) == pytest.approx(110.0 + halfwidth)
    assert float(none["val_ppl"]) == float(none["val_ppl_mean"]) == pytest.approx(111.0)
    assert float(none["val_ppl_ci_high"]) == pytest.approx(111.0 + halfwidth)
    single = rows["dynamic_q policy.reward=neg_loss"]
    assert float(single["test_ppl_std"]) == 0.0 and single["test_ppl_ci_low"] == single["test_ppl_ci_high"] == ""
    assert "| none |  | 4 | 3 | 110.00 ± 24.84 | 111.00 ± 24.84 | reference |" in markdown
    assert "99.00 (no CI: n=1)" in markdown


def test_paired_differences_against_the_reference_on_shared_seeds(study, tmp_path):
    rows, markdown, _ = report(study, tmp_path / "out")
    assert {row["paired_reference"] for row in rows.values()} == {"none"}
    assert rows["none"]["is_reference"] == "True" and rows["none"]["paired_n"] == ""

    cyclic = rows["cyclic"]  # seeds 0-2: 90-100, 104-110, 111-120 = -10, -6, -9; seed 3 has no partner
    halfwidth = T_975[2] * math.sqrt(13 / 3) / math.sqrt(3)
    assert cyclic["paired_metric"] == "test_ppl" and int(cyclic["paired_n"]) == 3
    assert float(cyclic["paired_diff_mean"]) == pytest.approx(-25 / 3)
    assert float(cyclic["paired_diff_ci_low"]) == pytest.approx(-25 / 3 - halfwidth)
    assert float(cyclic["paired_diff_ci_high"]) == pytest.approx(-25 / 3 + halfwidth)
    assert cyclic["paired_diff_contains_zero"] == "False"

    stuck = rows["dynamic_q policy.reward=paper"]  # 95-100, 118-110 = -5, +8
    assert int(stuck["paired_n"]) == 2 and float(stuck["paired_diff_mean"]) == pytest.approx(1.5)
    assert float(stuck["paired_diff_ci_high"]) == pytest.approx(1.5 + T_975[1] * 6.5)
    assert stuck["paired_diff_contains_zero"] == "True"

    single = rows["dynamic_q policy.reward=neg_loss"]
    assert int(single["paired_n"]) == 1 and float(single["paired_diff_mean"]) == -1.0
    assert single["paired_diff_ci_low"] == single["paired_diff_contains_zero"] == ""

    assert "| -8.33 ± 5.17 | 3 |" in markdown
    assert "| +1.50 ± 82.59 (ns) | 2 |" in markdown
    assert "| -1.00 (no CI: 1 pair) | 1 |" in markdown
    assert "(ns): the interval contains 0" in markdown


def test_warning_for_an_agent_that_could_not_learn(study, tmp_path):
    rows, markdown, printed = report(study, tmp_path / "out")
    warning = ("warning: dynamic_q (gpt2/pydoc, policy.reward=paper): the agent could not have learned: 100% of "
               "rewards were clipped at the floor; epsilon never fell below 0.86 (it explored at random most of the "
               "time)")
    assert warning in printed.splitlines()
    assert f"- **{warning}**" in markdown
    assert rows["dynamic_q policy.reward=paper"]["learning_warning"] == warning
    assert "| dynamic_q ⚠ could not learn | policy.reward=paper |" in markdown
    assert "| 12 | 0.86 ⚠ | 100% ⚠ |" in markdown

    assert rows["dynamic_q policy.reward=neg_loss"]["learning_warning"] == ""
    assert "| 400 | 0.01 | 0% |" in markdown
    assert printed.count("warning:") == markdown.count("warning:") == 1


def test_summaries_without_a_test_split_fall_back_to_val(tmp_path):
    for seed, ppl in enumerate((100.0, 110.0)):  # written before the test split: val only
        make_run(tmp_path / "runs" / "none" / str(seed), seed, run_summary(val_ppl=ppl), name="none")
    for seed, ppl in enumerate((97.0, 105.0)):
        make_run(tmp_path / "runs" / "cyclic" / str(seed), seed, run_summary(test_ppl=ppl - 10, val_ppl=ppl),
                 name="cyclic")
    make_run(tmp_path / "runs" / "sequential" / "0", 0, run_summary(test_ppl=90.0), name="sequential")
    make_run(tmp_path / "runs" / "sequential" / "1", 1, run_summary(val_ppl=91.0), name="sequential")
    rows, markdown, _ = report(tmp_path / "runs", tmp_path / "out")
    assert rows["none"]["test_ppl_mean"] == "" and float(rows["none"]["val_ppl"]) == 105.0
    assert rows["sequential"]["test_ppl_mean"] == ""  # one seed of two has no test split: no test interval
    assert float(rows["sequential"]["val_ppl_mean"]) == 91.0
    cyclic = rows["cyclic"]
    assert cyclic["paired_metric"] == "val_ppl"  # its reference has no test split: both on val
    assert float(cyclic["paired_diff_mean"]) == pytest.approx(-4.0)  # 97-100, 105-110
    assert "| -4.00 ± 12.71 (ns, val) |" in markdown
    assert "2 of 3 groups have summaries without test_*" in markdown
    assert "the figure plots val_ppl for every run" in markdown
    assert figure_metric(group_runs(find_runs([tmp_path / "runs" / "cyclic"]))) == "test_ppl"


def test_a_reference_policy_without_runs_leaves_the_columns_blank(study, tmp_path):
    out = tmp_path / "out"
    report_main([str(study), "--out", str(out), "--reference", "sequential"])
    rows = list(csv.DictReader((out / "report.csv").open()))
    paired = ("paired_reference", "paired_metric", "paired_n", "paired_diff_mean", "paired_diff_ci_low",
              "paired_diff_ci_high", "paired_diff_contains_zero")
    assert {row[column] for row in rows for column in paired} == {""}
    markdown = (out / "report.md").read_text()
    assert "Δ PPL vs sequential" in markdown
    assert "No sequential group for gpt2/pydoc: no Δ there." in markdown


def test_reference_prefers_no_label_then_most_layers(tmp_path):
    make_run(tmp_path / "a" / "0", 0, run_summary(100.0), name="none", n_sets=1)
    make_run(tmp_path / "b" / "0", 0, run_summary(100.0), name="none", n_sets=2)
    make_run(tmp_path / "c" / "0", 0, run_summary(100.0), name="none", n_sets=1, reward="neg_loss")
    groups = group_runs(find_runs([tmp_path]))
    assert [group.label for group in groups] == ["", "policy.n_sets=2", "policy.reward=neg_loss"]
    assert reference_groups(groups, "none")[("gpt2", "pydoc")] is groups[0]
    assert reference_groups(groups, "cyclic") == {}

    for group, n_layer in zip(groups[1:], (4, 8), strict=True):  # both labelled: the one with more layers
        group.settings["model.n_layer"] = n_layer
    assert reference_groups(groups[1:], "none")[("gpt2", "pydoc")] is groups[2]


def test_ablation_arms_are_listed_with_their_overrides_and_notes(study, tmp_path):
    arms = [
        {"arm": "none", "folder": "01_none", "note": "",
         "overrides": ["+experiment=ablation_cpu", "policy=none", "train.seed=0,1,2"]},
        {"arm": "dynamic_q", "folder": "03_dynamic_q", "note": "the method, at the paper's settings",
         "overrides": ["+experiment=ablation_cpu", "policy=dynamic_q", "train.seed=0,1"]},
    ]
    (study / ARMS_FILE).write_text(json.dumps({"arms": arms}))
    _, markdown, _ = report(study, tmp_path / "out")
    assert f"## Ablation arms in `{study}`" in markdown
    assert ("- `01_none` **none**: `tyingrun -m +experiment=ablation_cpu policy=none train.seed=0,1,2` "
            "(table: none)") in markdown
    assert ("- `03_dynamic_q` **dynamic_q**: `tyingrun -m +experiment=ablation_cpu policy=dynamic_q train.seed=0,1`: "
            "the method, at the paper's settings (table: dynamic_q policy.reward=paper)") in markdown


def test_no_arms_section_without_the_arms_file(study, tmp_path):
    _, markdown, _ = report(study, tmp_path / "out")
    assert "Ablation arms" not in markdown
