"""benchmarks/oracle_ceilings.py: its patch rules and a tiny end-to-end run through the training engine."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` lives at the repository root

from benchmarks import oracle_ceilings  # noqa: E402
from faithful_vit.kernels import use_backend  # noqa: E402

TINY = ["--image-size", "32", "--embed-dim", "32", "--depth", "1", "--heads", "2", "--batch", "16"]


def test_rule_oracles_keep_what_their_rule_says():
    fg = torch.zeros(1, 1, 32, 32)
    fg[0, 0, 8:20, 8:20] = 1  # 12 x 12 px: 1 full patch, 4 half, 4 quarter ones on the 4 x 4 grid of 8 px patches
    kept = {}
    for rule in ("gt_any", "gt_half", "gt_interior", "gt_any_dilated"):
        args = oracle_ceilings.parse_args(["--models", rule, *TINY])
        kept[rule] = oracle_ceilings.build_model(rule, args).keep_mask(fg).view(4, 4)
    assert kept["gt_interior"].sum() == 1 and kept["gt_interior"][1, 1]
    assert kept["gt_half"].sum() == 1  # a half-covered patch is not > 0.5
    assert kept["gt_any"].sum() == 4 and kept["gt_any"][1:3, 1:3].all()
    assert kept["gt_any_dilated"].all()  # one ring of 8 neighbours around the 2 x 2 block covers the 4 x 4 grid
    baseline = oracle_ceilings.build_model("baseline", args)
    assert not hasattr(baseline, "keep_mask") and baseline.uses_ground_truth_mask is False


def test_tiny_run_reports_ceilings(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_VIT_DATA", str(tmp_path / "data"))
    out = tmp_path / "oracle.json"
    argv = ["--models", "baseline", "gt_any", "--epochs", "2", *TINY, "--n-train", "64", "--n-val", "32"]
    argv += ["--n-test", "32", "--run-dir", str(tmp_path / "runs"), "--json", str(out)]
    with use_backend("torch"):  # the Triton interpreter is too slow for training
        results = oracle_ceilings.main(argv)
    assert [r["model"] for r in results] == ["baseline", "gt_any"]
    baseline, oracle = results
    for r in results:
        assert [h["epoch"] for h in r["history"]] == [0, 1]
        assert 0 <= r["test"]["wga"] <= r["test"]["avg_acc"] <= 1 and len(r["test"]["group_acc"]) == 4
        assert (tmp_path / "runs" / r["model"] / "metrics.jsonl").is_file()
    assert baseline["kept_frac"] == 1.0 and 0 < oracle["kept_frac"] < 1
    assert oracle["non_object_in_kept"] < baseline["non_object_in_kept"]
    saved = json.loads(out.read_text())
    assert saved["results"][1]["test"] == oracle["test"]
    assert saved["meta"]["benchmark_config"]["n_train"] == 64 and saved["meta"]["device_type"] == "cpu"
