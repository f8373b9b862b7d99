"""The transfer study (benchmarks/transfer_study.py): its verdicts, and a small run end to end.

The real study (5 seeds, 500k rows) is a benchmark whose JSON is committed; here it runs on
a tiny log with two seeds, and its figures must agree with each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import transfer_study  # noqa: E402


def _run(delta: float, p: float, auc: float = 0.7) -> dict:
    return {
        "test_auc": {"ctr": auc},
        "seconds_per_epoch": 1.0,
        "rows_per_second": 10.0,
        "epochs_run": 2,
        "best_epoch": 1,
        "vs_independent": {"ctr": {"delta": delta, "ci_low": None, "ci_high": None, "p_value": p}},
    }


@pytest.mark.parametrize(
    ("runs", "verdict", "wins", "losses"),
    [
        ([(0.01, 0.001), (0.02, 0.01), (0.01, 0.04), (-0.01, 0.5), (0.0, 0.9)], "win", 3, 0),
        ([(-0.01, 0.001), (-0.02, 0.01), (-0.01, 0.04), (0.01, 0.5), (0.0, 0.9)], "loss", 0, 3),
        ([(0.01, 0.001), (0.02, 0.01), (-0.01, 0.04), (-0.01, 0.001), (0.0, 0.9)], "no significant difference", 2, 2),
        ([(0.01, 0.2), (0.02, 0.3), (0.01, 0.06)], "no significant difference", 0, 0),
    ],
)
def test_a_verdict_needs_a_significant_majority_of_seeds(runs, verdict, wins, losses):
    summary = transfer_study._summarise([_run(d, p) for d, p in runs])
    versus = summary["vs_independent"]["ctr"]
    assert versus["verdict"] == verdict
    assert (versus["significant_wins"], versus["significant_losses"]) == (wins, losses)
    assert versus["delta"]["mean"] == pytest.approx(sum(d for d, _ in runs) / len(runs))
    assert 0.0 <= versus["seed_t_test_p"] <= 1.0


def test_targets_name_a_miss():
    models = {
        "independent": transfer_study._summarise([_run(0, 1, 0.73)] * 2),
        "recommended": transfer_study._summarise([_run(-0.01, 0.001, 0.72), _run(-0.01, 0.002, 0.72)]),
    }
    del models["independent"]["vs_independent"]
    checks = transfer_study._targets("synthetic", models)
    assert checks["recommended.ctr >= independent.ctr"]["met"] is False
    assert checks["no significant loss on ctr"] == {"value": "loss", "met": False}
    assert checks["a significant win on at least one task"]["met"] is False
    assert checks["recommended.ctr >= 0.725"] == {"value": 0.72, "met": False}


def test_small_study_end_to_end(tmp_path: Path):
    out = tmp_path / "study"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "transfer_study.py"), "--only", "synthetic", "--seeds", "2",
        "--models", "independent,shared_embedding", "--synthetic-rows", "6000", "--synthetic-test-rows", "4000",
        "--threads", "1", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "[4/4] synthetic shared_embedding seed 1" in proc.stderr  # progress on stderr
    result = json.loads(out.with_suffix(".json").read_text())
    models = result["synthetic"]["models"]
    assert set(models) == {"independent", "shared_embedding"}
    ind, shared = models["independent"], models["shared_embedding"]
    for task in ("ctr", "cvr", "satisfaction"):
        # each seed's DeLong delta is that seed's test AUC difference to the same seed's independent model
        for seed in range(2):
            delta = shared["runs"][seed]["vs_independent"][task]["delta"]
            diff = shared["runs"][seed]["test_auc"][task] - ind["runs"][seed]["test_auc"][task]
            assert delta == pytest.approx(diff, abs=1e-9)
        assert len(shared["vs_independent"][task]["delong_p"]) == 2
    assert ind["parameters"] > shared["parameters"]  # three table sets against one
    markdown = out.with_suffix(".md").read_text()
    assert "| shared_embedding |" in markdown and "(baseline)" in markdown
    assert out.with_suffix(".png").stat().st_size > 0


def test_small_mtl_table_end_to_end(tmp_path: Path):
    """benchmarks/mtl_table.py on the same machinery: a variant row (config + overrides) with its
    gate diagnostics, against independent."""
    out = tmp_path / "table"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "mtl_table.py"), "--only", "synthetic", "--seeds", "1",
        "--rows", "independent,mmoe_dselect_k", "--synthetic-rows", "6000", "--synthetic-test-rows", "4000",
        "--threads", "1", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["rows"]["mmoe_dselect_k"] == {
        "config": "mmoe",
        "overrides": ["model.gate=dselect_k", "model.gate_k=2", "model.gate_entropy=0.01"],
    }
    models = result["synthetic"]["models"]
    assert set(models) == {"independent", "mmoe_dselect_k"}
    gates = models["mmoe_dselect_k"]["gates"]
    assert 1 / 4 <= gates["largest_share"]["mean"] <= 1.0  # 4 experts: the largest share is at least uniform's
    assert 0.0 <= gates["entropy_ratio"]["mean"] <= 1.0
    assert "gates" not in models["independent"]  # no gate to report
    assert set(models["mmoe_dselect_k"]["vs_independent"]) == {"ctr", "cvr", "satisfaction"}
    markdown = out.with_suffix(".md").read_text()
    assert "| mmoe_dselect_k |" in markdown and "*gate options on mmoe*" in markdown
    assert "`mmoe_dselect_k` = mmoe.yaml model.gate=dselect_k" in markdown


def test_small_mtl_table_rows_on_other_tasks_meet_their_own_baseline(tmp_path: Path):
    """AITM (ctr + ctcvr) is compared with independent models on its own tasks, ESCM2 with the
    ESMM it adds its risk to; neither lands in the main table or the plot against independent.
    Two seeds: every seed trains with the same data overrides."""
    out = tmp_path / "table"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "mtl_table.py"), "--only", "synthetic", "--seeds", "2",
        "--rows", "independent,aitm,escm2_ips_ple", "--synthetic-rows", "6000", "--synthetic-test-rows", "4000",
        "--threads", "1", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    models = json.loads(out.with_suffix(".json").read_text())["synthetic"]["models"]
    # The baselines the rows need are trained although --rows does not name them.
    assert set(models) == {"independent", "aitm", "independent_aitm", "escm2_ips_ple", "esmm_ple"}
    assert models["aitm"]["baseline"] == "independent_aitm" and set(models["aitm"]["vs_independent"]) == {
        "ctr",
        "ctcvr",
    }
    assert models["escm2_ips_ple"]["baseline"] == "esmm_ple" and len(models["aitm"]["runs"]) == 2
    assert set(models["escm2_ips_ple"]["vs_independent"]) == {"ctr", "cvr", "satisfaction", "ctcvr"}
    assert "vs_independent" not in models["esmm_ple"] and "baseline" not in models["independent"]
    markdown = out.with_suffix(".md").read_text()
    main_table = markdown.split("Rows on other tasks", 1)[0]
    assert "| aitm |" not in main_table and "| esmm_ple |" not in main_table
    assert "against `independent_aitm`" in markdown and "ctcvr vs esmm_ple" in markdown


def test_small_warm_start_study_end_to_end(tmp_path: Path):
    """benchmarks/warm_start.py on a tiny log: its figures agree with each other."""
    out = tmp_path / "warm"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "warm_start.py"), "--seeds", "1", "--rows", "8000",
        "--test-rows", "4000", "--epochs", "2", "--threads", "1", "--no-census", "--affinity-every", "2",
        "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.with_suffix(".json").read_text())
    run = result["runs"][0]
    # The scratch run reaches its own best validation AUC, at the epoch where it is best.
    best = max(run["valid_curve"]["scratch"])
    assert run["target_valid_auc"] == best
    assert run["reach"]["scratch"]["epoch"] == run["valid_curve"]["scratch"].index(best) + 1
    assert run["reach"]["scratch"]["steps"] == run["reach"]["scratch"]["epoch"] * run["steps_per_epoch"]
    for name in ("warm", "warm_frozen_embedding"):
        reach = run["reach"][name]
        assert reach["epoch"] is None or run["valid_curve"][name][reach["epoch"] - 1] >= best
        assert reach["epoch"] is not None or max(run["valid_curve"][name]) < best
        assert set(run["test_auc"][name]) == {"ctr", "cvr", "satisfaction"}
    assert set(run["old_tasks_test_auc"]["ctr"]) == {"before", "warm", "warm_frozen_embedding"}
    mmoe, independent = result["affinity"]["synthetic"]["mmoe"], result["affinity"]["synthetic"]["independent"]
    assert mmoe["tasks"] == ["ctr", "cvr", "satisfaction"] and mmoe["measurements"] > 0
    assert all(abs(mmoe["gradient_cosine"][i][i] - 1.0) < 1e-6 for i in range(3))
    assert independent["shared"] == "none"
    markdown = out.with_suffix(".md").read_text()
    assert "Steps to the scratch model's best validation AUC" in markdown and "shares no parameters" in markdown
    assert out.with_suffix(".png").stat().st_size > 0
