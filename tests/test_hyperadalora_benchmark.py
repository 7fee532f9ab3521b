"""benchmarks/hyperadalora_convergence.py: the learning-rate grid's choice and its hand-over to the seeded runs
(fits replaced by fixed curves: the choice, not the training, is under test)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import hyperadalora_convergence as bench  # noqa: E402

FINALS = {  # contender → lr → final metric (NaN: diverged)
    "AdaLoRA": {1e-3: 0.70, 5e-3: 0.80},
    "HyperAdaLoRA-triplet": {1e-3: 0.75, 5e-3: math.nan},
}


@pytest.mark.parametrize("task, best", [("minilm-rt", {"AdaLoRA": 5e-3, "HyperAdaLoRA-triplet": 1e-3}),
                                        ("smollm2-hamlet", {"AdaLoRA": 1e-3, "HyperAdaLoRA-triplet": 1e-3})])
def test_lr_grid_picks_each_contender_best_and_lrs_from_uses_it(monkeypatch, tmp_path, task, best):
    def fake_run(cls, kwargs, train, val, args, seed):
        name = next(n for n, (c, k) in bench.contenders(args_at[kwargs["learning_rate"]]).items() if k == kwargs)
        return {"curve": [(10, FINALS[name][kwargs["learning_rate"]], 1.0)], "step_times": [0.1]}

    monkeypatch.setattr(bench, "draw_batches", lambda args, seed: ([], []))
    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)  # results go to the test's folder
    argv = ["--task", task, "--lr-grid", "1e-3", "5e-3", "--seeds", "0", "--only", *FINALS, "--name", "grid"]
    args = bench.parse_args(argv)
    args_at = {lr: bench.argparse.Namespace(**{**vars(args), "contender_lr": None, "lr": lr, "lora_lr": lr})
               for lr in (1e-3, 5e-3)}
    bench.lr_grid(args)
    result = json.loads((tmp_path / "grid_lr_grid.json").read_text())
    assert result["best_lr"] == best  # lower perplexity wins on Hamlet; a diverged run never wins
    chosen = bench.contenders(bench.parse_args(["--lrs-from", str(tmp_path / "grid_lr_grid.json")]))
    assert {name: chosen[name][1]["learning_rate"] for name in FINALS} == best
    assert chosen["HyperAdaLoRA-triplet"][1]["hypernet_lr"] == pytest.approx(0.1 * best["HyperAdaLoRA-triplet"])


def test_a_grid_split_by_only_is_read_back_from_both_files(monkeypatch, tmp_path):
    def fake_run(cls, kwargs, train, val, args, seed):  # every contender best at 5e-3
        return {"curve": [(10, 0.8 if kwargs["learning_rate"] == 5e-3 else 0.7, 1.0)], "step_times": [0.1]}

    monkeypatch.setattr(bench, "draw_batches", lambda args, seed: ([], []))
    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    for part in FINALS:
        bench.lr_grid(bench.parse_args(["--lr-grid", "1e-3", "5e-3", "--seeds", "0", "--only", part, "--name", part]))
    files = [str(tmp_path / f"{part}_lr_grid.json") for part in FINALS]
    chosen = bench.contenders(bench.parse_args(["--lrs-from", *files]))
    assert {name: chosen[name][1]["learning_rate"] for name in FINALS} == {name: 5e-3 for name in FINALS}
    assert chosen["LoRA"][1]["learning_rate"] == 1e-3  # in neither file: the --lora-lr default
    bench.main(["--merge", *files, "--name", "grid"])  # the two parts as one grid file
    merged = json.loads((tmp_path / "grid_lr_grid.json").read_text())
    assert merged["best_lr"] == {name: 5e-3 for name in FINALS} and set(merged["final"]) == set(FINALS)
    # its command computes it in one process (the parts can go) into the same file: same grid, same choice
    assert merged["command"] == ("python benchmarks/hyperadalora_convergence.py --lr-grid 0.001 0.005 --seeds 0 "
                                 "--only AdaLoRA HyperAdaLoRA-triplet --jobs 2 --name grid")
    (tmp_path / "grid_lr_grid.json").unlink()
    bench.main([*merged["command"].split()[2:], "--jobs", "1"])
    again = json.loads((tmp_path / "grid_lr_grid.json").read_text())
    assert again["final"] == merged["final"] and again["best_lr"] == merged["best_lr"]
    # a part that ran other settings is not part of the same grid
    bench.lr_grid(bench.parse_args(["--lr-grid", "2e-3", "--seeds", "0", "--only", "LoRA", "--steps", "20",
                                    "--name", "short"]))
    with pytest.raises(SystemExit, match="short_lr_grid.json ran other settings"):
        bench.main(["--merge", *files, str(tmp_path / "short_lr_grid.json"), "--name", "bad"])


def test_the_grid_run_at_the_chosen_rate_stands_for_its_seed(monkeypatch, tmp_path):
    calls = []

    def fake_run(cls, kwargs, train, val, args, seed):
        calls.append((seed, kwargs["learning_rate"]))
        return {"curve": [(10, 0.8 if kwargs["learning_rate"] == 5e-3 else 0.7, 1.0)], "step_times": [0.1]}

    monkeypatch.setattr(bench, "draw_batches", lambda args, seed: ([], []))
    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(bench, "report", lambda runs, args, seeds: None)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    bench.main(["--lr-grid", "1e-3", "5e-3", "--seeds", "0", "--only", "AdaLoRA", "--name", "g"])
    calls.clear()
    bench.main(["--lrs-from", str(tmp_path / "g_lr_grid.json"), "--seeds", "0", "1", "--only", "AdaLoRA"])
    assert calls == [(1, 5e-3)]  # seed 0 at 5e-3 was the grid's run
    bench.main(["--lrs-from", str(tmp_path / "g_lr_grid.json"), "--seeds", "0", "--only", "AdaLoRA", "--steps", "20"])
    assert calls == [(1, 5e-3), (0, 5e-3)]  # another run length: not the same run, fitted again


def test_seeds_run_in_parts_merge_into_one_file_whose_command_runs_them_together(monkeypatch, tmp_path):
    def fake_run(cls, kwargs, train, val, args, seed):  # best at 5e-3; each seed its own curve
        return {"curve": [(10, 0.6 + seed / 100, 1.0), (20, 0.7 + seed / 100 + kwargs["learning_rate"], 2.0)],
                "step_times": [0.1]}

    monkeypatch.setattr(bench, "draw_batches", lambda args, seed: ([], []))
    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "plot", lambda *args: None)
    bench.main(["--lr-grid", "1e-3", "5e-3", "--seeds", "0", "--only", "AdaLoRA", "LoRA", "--name", "g"])
    grid = str(tmp_path / "g_lr_grid.json")
    for seed in ("1", "2"):
        bench.main(["--lrs-from", grid, "--seeds", seed, "--only", "AdaLoRA", "LoRA", "--name", f"s{seed}"])
    bench.main(["--merge", str(tmp_path / "s1.json"), str(tmp_path / "s2.json"), "--name", "merged"])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["command"] == (f"python benchmarks/hyperadalora_convergence.py --lrs-from {grid} --seeds 1 2 "
                                 "--only LoRA AdaLoRA --jobs 2 --name merged")
    assert merged["results"]["AdaLoRA"]["final_per_seed"] == [pytest.approx(0.715), pytest.approx(0.725)]
    (tmp_path / "merged.json").unlink()  # the recorded command writes the merged file again, not another
    bench.main([*merged["command"].split()[2:], "--jobs", "1"])
    together = json.loads((tmp_path / "merged.json").read_text())
    assert together["results"]["AdaLoRA"]["final_per_seed"] == merged["results"]["AdaLoRA"]["final_per_seed"]
