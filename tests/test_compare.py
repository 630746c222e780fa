"""``fedrir compare`` on real data: the table equals the runs, and the grid resumes and refuses.

One small grid (FedRIR and FedAvg × seeds 0 and 1, 2 rounds of 3 clients on 600 images of the
registry's synthetic dataset) is run once per module; tests that change a grid work on a copy.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fedrir.algorithms
import fedrir.api
from fedrir.algorithms.base import Update
from fedrir.algorithms.baseline import Baseline
from fedrir.algorithms.fedavg import FedAvg
from fedrir.algorithms.local import Local
from fedrir.cli import add_compare_command
from fedrir.compare import compare, parse_seeds, run_dir
from fedrir.config import ALGORITHM_KEYS, Config, with_overrides
from fedrir.errors import ConfigError, FedrirError
from fedrir.progress import GridProgress
from fedrir.results import line_looks, read_metrics

ALGORITHMS = ["fedrir", "fedavg"]
SEEDS = [0, 1]
SETTINGS: dict[str, Any] = {
    "dataset": "synthetic",
    "fraction": 0.2,
    "clients": 3,
    "partition": "pat",
    "classes_per_client": 4,
    "rounds": 2,
    "batch_size": 50,
    "embed_dim": 16,
    "device": "cpu",
}


def settings(cache: Path, **overrides: Any) -> Config:
    return with_overrides(Config(), SETTINGS | {"cache_dir": str(cache)} | overrides)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    base = tmp_path_factory.mktemp("compare")
    out = base / "grid"
    return out, compare(settings(base / "cache"), ALGORITHMS, SEEDS, out)


def copy_of(grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> Path:
    out = tmp_path / "grid"
    shutil.copytree(grid[0], out)
    return out


def forbid(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run started although none should")

    for name in names:
        monkeypatch.setattr(fedrir.api, name, fail)


def summary(out: Path, algorithm: str, seed: int) -> dict[str, Any]:
    return json.loads((run_dir(out, algorithm, seed) / "summary.json").read_text())


def test_table_equals_the_runs(grid: tuple[Path, list[dict[str, Any]]]) -> None:
    out, rows = grid
    for name in ("compare.toml", "results.csv", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert sorted(r["algorithm"] for r in table) == sorted(ALGORITHMS)
    assert [r["algorithm"] for r in table] == [r["algorithm"] for r in rows]
    finals = [float(r["final_accuracy_mean"]) for r in table]
    assert finals == sorted(finals, reverse=True)  # sorted by final accuracy
    for row, written in zip(rows, table, strict=True):
        runs = [summary(out, row["algorithm"], s) for s in SEEDS]
        final = [100 * s["final_accuracy"] for s in runs]
        best = [100 * s["best_accuracy"] for s in runs]
        expected = {
            "final_accuracy_mean": statistics.fmean(final),
            "final_accuracy_std": statistics.stdev(final),
            "best_accuracy_mean": statistics.fmean(best),
            "best_accuracy_std": statistics.stdev(best),
            "client_accuracy_std": statistics.fmean(100 * s["client_accuracy_std"] for s in runs),
            "bytes_uploaded_per_round": statistics.fmean(
                s["bytes_uploaded_per_round"] for s in runs
            ),
            "seconds_per_round": statistics.fmean(s["seconds_per_round"] for s in runs),
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-12), key
            assert float(written[key]) == pytest.approx(value, rel=1e-12), key
        assert row["mb_uploaded_per_round"] == pytest.approx(row["bytes_uploaded_per_round"] / 1e6)
        assert row["shared_parameters"] == runs[0]["parameters"]["shared"] > 0
        assert int(written["private_parameters"]) == runs[0]["parameters"]["private"]
        assert row["seeds"] == int(written["seeds"]) == 2
        assert len(read_metrics(run_dir(out, row["algorithm"], 0) / "metrics.jsonl")) == 2
    fedavg = next(r for r in rows if r["algorithm"] == "fedavg")
    assert fedavg["private_parameters"] == 0  # FedAvg keeps nothing private
    md = (out / "results.md").read_text()
    assert "sorted by final accuracy" in md
    assert "partition `pat`" in md and "clients 3" in md and "rounds 2" in md
    assert f"--out {out}" in md  # the command
    body = [line for line in md.splitlines() if line.startswith("| fed")]
    assert [line.split("|")[1].strip() for line in body] == [r["algorithm"] for r in rows]
    assert f"| {rows[0]['final_accuracy_mean']:.2f} ± {rows[0]['final_accuracy_std']:.2f} |" in md


def test_rerun_redoes_nothing_and_a_subset_of_seeds_is_tabulated(
    grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(grid, tmp_path)
    config = settings(grid[0].parent / "cache")
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    assert len(mtimes) == 4
    forbid(monkeypatch, "run", "resume")
    assert compare(config, ALGORITHMS, SEEDS, out) == grid[1]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")} == mtimes
    rows = compare(config, ["fedavg"], [1], out)
    s = summary(out, "fedavg", 1)
    assert len(rows) == 1 and rows[0]["seeds"] == 1 and rows[0]["final_accuracy_std"] is None
    assert rows[0]["final_accuracy_mean"] == 100 * s["final_accuracy"]


def test_an_interrupted_grid_resumes_where_it_stopped(
    grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(grid[0].parent / "cache")
    out = tmp_path / "grid"
    real_run, real_resume = fedrir.api.run, fedrir.api.resume
    calls: list[tuple[str, str]] = []

    def killed_after_round_1(cfg: Config, path: Path, **kwargs: Any) -> fedrir.RunResult:
        calls.append(("run", path.name))
        on_round: Callable[[Any, int], None] = kwargs["on_round"]

        def stop(record: Any, round_: int) -> None:
            on_round(record, round_)
            if cfg.seed == 1:
                raise KeyboardInterrupt

        return real_run(cfg, path, on_round=stop)

    monkeypatch.setattr(fedrir.api, "run", killed_after_round_1)
    with pytest.raises(KeyboardInterrupt):
        compare(config, ["fedavg"], SEEDS, out)
    assert (run_dir(out, "fedavg", 0) / "summary.json").exists()
    assert not (run_dir(out, "fedavg", 1) / "summary.json").exists()
    assert not (out / "results.csv").exists()

    def resume(path: Path, **kwargs: Any) -> fedrir.RunResult:
        calls.append(("resume", Path(path).name))
        return real_resume(path, **kwargs)

    monkeypatch.setattr(fedrir.api, "resume", resume)
    rows = compare(config, ["fedavg"], SEEDS, out)
    assert calls == [("run", "fedavg-seed0"), ("run", "fedavg-seed1"), ("resume", "fedavg-seed1")]
    assert [r["round"] for r in read_metrics(run_dir(out, "fedavg", 1) / "metrics.jsonl")] == [1, 2]
    # the resumed run ends where the uninterrupted one of the module's grid did
    assert (
        summary(out, "fedavg", 1)["final_accuracy"]
        == summary(grid[0], "fedavg", 1)["final_accuracy"]
    )
    assert rows[0]["seeds"] == 2 and (out / "results.md").exists()


def test_other_settings_in_the_same_folder_are_refused(
    grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(grid, tmp_path)
    forbid(monkeypatch, "run", "resume")
    config = settings(grid[0].parent / "cache", rounds=3, alpha=0.5)
    with pytest.raises(FedrirError, match=r"other settings \(rounds: 2 there, 3 here; alpha"):
        compare(config, ALGORITHMS, SEEDS, out)
    # a grid that failed before its first run started takes corrected settings
    monkeypatch.undo()
    typo = tmp_path / "typo"
    with pytest.raises(FedrirError, match="unknown dataset 'nope'"):
        compare(settings(grid[0].parent / "cache", dataset="nope"), ["fedavg"], [0], typo)
    assert (typo / "compare.toml").exists() and not (typo / "runs").exists()
    compare(config, ["fedavg"], [0], typo)
    assert 'dataset = "synthetic"' in (typo / "compare.toml").read_text()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FedrirError, match="not empty and holds no compare"):
        compare(config, ALGORITHMS, SEEDS, tmp_path / "busy")


def test_a_damaged_finished_run_is_named_with_the_fix(
    grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(grid, tmp_path)
    forbid(monkeypatch, "run", "resume")
    cell = run_dir(out, "fedavg", 1)
    (cell / "metrics.jsonl").write_text('{"round": 1, "accur')
    with pytest.raises(
        FedrirError, match=rf"finished run in {re.escape(str(cell))} is damaged .* delete that"
    ):
        compare(settings(grid[0].parent / "cache"), ALGORITHMS, SEEDS, out)
    (cell / "metrics.jsonl").write_text(
        (grid[0] / cell.relative_to(out) / "metrics.jsonl").read_text()
    )
    (cell / "summary.json").write_text('{"final_accuracy": 0.5}')
    with pytest.raises(FedrirError, match=r"damaged \('best_accuracy' is missing\)"):
        compare(settings(grid[0].parent / "cache"), ALGORITHMS, SEEDS, out)


def test_a_run_may_differ_from_its_grid_only_in_settings_its_algorithm_never_reads(
    grid: tuple[Path, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grid continues past a run recorded under another default of a key its algorithm does
    not read (the project's grid: `ft_epochs` went from 1 to 10 for FedBABU and FedAvg-FT)."""
    out = copy_of(grid, tmp_path)
    forbid(monkeypatch, "run", "resume")
    config = settings(grid[0].parent / "cache")
    for algorithm, old, new in (
        ("fedavg", "ft_epochs = 10", "ft_epochs = 1"),
        ("fedrir", "prox_mu = 0.01", "prox_mu = 0.5"),
    ):
        cell = run_dir(out, algorithm, 0) / "config.toml"
        cell.write_text(cell.read_text().replace(old, new))
    assert compare(config, ALGORITHMS, SEEDS, out) == grid[1]
    cell = run_dir(out, "fedrir", 1)
    (cell / "config.toml").write_text(
        (cell / "config.toml").read_text().replace("kl_weight = 0.1", "kl_weight = 0.2")
    )
    with pytest.raises(
        FedrirError, match=rf"{re.escape(str(cell))} differs .*kl_weight: 0.2 there"
    ):
        compare(config, ALGORITHMS, SEEDS, out)


def diverge_on(monkeypatch: pytest.MonkeyPatch, cls: type, seeds: set[int]) -> None:
    """Make ``cls``'s clients report a NaN training loss in every round of runs with ``seeds``."""
    update = Baseline.local_update

    def nan_loss(self: Baseline, *args: Any) -> Update:
        result = update(self, *args)
        if self.config.seed in seeds:
            result.metrics["train_loss"] = float("nan")
        return result

    monkeypatch.setattr(cls, "local_update", nan_loss)


def test_a_diverged_run_is_named_not_reported_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedAvg diverges in seed 1, Local in every seed: the grid goes on, FedAvg's row covers
    seed 0 and is ranked last, Local has no row, and a rerun starts nothing."""
    config, out = settings(tmp_path / "cache"), tmp_path / "grid"
    algorithms = ["fedavg", "local", "fedper"]
    with monkeypatch.context() as patch:
        diverge_on(patch, FedAvg, {1})
        diverge_on(patch, Local, {0, 1})
        rows = compare(config, algorithms, SEEDS, out)
    assert [r["algorithm"] for r in rows] == ["fedper", "fedavg"]
    fedper, fedavg = rows
    assert (fedper["seeds"], fedper["diverged_seeds"]) == (2, 0)
    assert (fedavg["seeds"], fedavg["diverged_seeds"]) == (1, 1)
    assert fedavg["final_accuracy_mean"] == 100 * summary(out, "fedavg", 0)["final_accuracy"]
    for algorithm, seed in (("fedavg", 1), ("local", 0), ("local", 1)):
        cell = run_dir(out, algorithm, seed)
        record = json.loads((cell / "diverged.json").read_text())
        assert record["round"] == 1 and "train_loss is nan" in record["error"]
        assert not (cell / "summary.json").exists()
    markdown = (out / "results.md").read_text()
    assert "| fedavg ‡ |" in markdown and "| local" not in markdown
    assert "Diverged: fedavg seed 1 in round 1; local seed 0 in round 1, seed 1 in round 1." in (
        markdown
    )
    with open(out / "results.csv", newline="") as f:
        table = {r["algorithm"]: r for r in csv.DictReader(f)}
    assert set(table) == {"fedper", "fedavg"} and table["fedavg"]["diverged_seeds"] == "1"

    forbid(monkeypatch, "run", "resume")  # unpatched now, yet nothing is retried
    assert compare(config, algorithms, SEEDS, out) == rows
    (run_dir(out, "local", 0) / "diverged.json").write_text("{")
    with pytest.raises(FedrirError, match=r"local-seed0/diverged.json is damaged .*delete it"):
        compare(config, algorithms, SEEDS, out)


def test_a_grid_whose_every_run_diverged_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    diverge_on(monkeypatch, Local, {0})
    out = tmp_path / "grid"
    with pytest.raises(FedrirError, match=r"every run of the grid in .*grid diverged"):
        compare(settings(tmp_path / "cache"), ["local"], [0], out)
    assert (run_dir(out, "local", 0) / "diverged.json").exists()


OTHER_VALUES: dict[str, Any] = {
    **{"mask_ratio": 0.3, "patch_size": 2, "kl_weight": 0.5, "idm": "none", "idm_weight": 2.0},
    **{"mcsl": False, "common_init": False, "prox_mu": 0.5, "ft_epochs": 2, "head_epochs": 2},
    **{"ditto_lambda": 0.5, "apfl_alpha": 0.25, "ala_eta": 0.5, "ala_rand_percent": 50},
    **{"ala_layer_idx": 1, "dbe_momentum": 0.5, "dbe_kappa": 5.0, "proto_lambda": 0.5},
    **{"cp_lambda": 1.0, "gpfl_lambda": 0.1, "gpfl_mu": 0.5, "as_align_lr": 0.1},
    **{"as_align_epochs": 2, "as_align_batch_size": 8},
}
"""A valid value other than the default for every algorithm's own setting."""


def numbers(config: Config) -> list[tuple[Any, ...]]:
    history = fedrir.api.run(config, out=None).history
    return [(r.accuracy, r.loss, r.client_accuracies, r.train) for r in history]


@pytest.mark.parametrize("name", list(fedrir.algorithms.ALGORITHMS))
def test_settings_an_algorithm_does_not_name_leave_its_run_unchanged(
    name: str, tmp_path: Path
) -> None:
    """What lets a grid accept such runs: every other algorithm's setting changed at once gives
    the same numbers to the last bit (and a setting it names is a key it can read)."""
    assert set(OTHER_VALUES) == ALGORITHM_KEYS
    own = fedrir.algorithms.ALGORITHMS[name].settings
    assert own <= ALGORITHM_KEYS
    config = settings(tmp_path, algorithm=name, rounds=2)
    others = {k: v for k, v in OTHER_VALUES.items() if k not in own}
    assert numbers(config) == numbers(with_overrides(config, others))


def test_a_setting_an_algorithm_reads_changes_its_run(tmp_path: Path) -> None:
    """The check above can fail: FedProx's μ, changed the same way, moves its numbers."""
    config = settings(tmp_path, algorithm="fedprox", rounds=2)
    assert numbers(config) != numbers(with_overrides(config, {"prox_mu": 0.5}))


def test_unknown_algorithm_or_bad_seeds_fail_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbid(monkeypatch, "run", "resume")
    out = tmp_path / "grid"
    with pytest.raises(ConfigError, match=r"unknown algorithm 'fedavgg'; choose one of: .*fedprox"):
        compare(settings(tmp_path), ["fedrir", "fedavgg"], SEEDS, out)
    with pytest.raises(ConfigError, match="distinct"):
        compare(settings(tmp_path), ["fedrir", "fedrir"], SEEDS, out)
    assert not out.exists()
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "a", "0,,1", "1.5", "-1", "0,0"):
        with pytest.raises(ConfigError, match="seeds"):
            parse_seeds(bad)


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedrir")
    add_compare_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def test_command_line_continues_the_grid_and_prints_the_table(
    grid: tuple[Path, list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = copy_of(grid, tmp_path)
    forbid(monkeypatch, "run", "resume")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    cache = str(grid[0].parent / "cache")
    argv = ["compare", "--algorithms", "fedrir,fedavg", "--seeds", "0,1", *flags]
    assert run_cli([*argv, "--cache-dir", cache, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| fedrir |" in printed.out and "| fedavg |" in printed.out
    assert (
        "compare" in printed.err
    )  # the grid's bar (its counts: test_the_grid_bar_counts_this_sessions_rounds)
    assert run_cli([*argv, "--cache-dir", cache, "--out", str(out), "--quiet"]) == 0
    assert "round" not in capsys.readouterr().err
    md = (out / "results.md").read_text()
    command = next(line for line in md.splitlines() if line.startswith("Command: `fedrir compare "))
    for flag in ("--algorithms fedrir,fedavg", "--seeds 0,1", "--fraction 0.2", "--clients 3"):
        assert flag in command
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'"):
        run_cli([*argv, "--algorithms", "nope", "--out", str(tmp_path / "other")])
    with pytest.raises(ConfigError, match="--seeds"):
        run_cli([*argv, "--seeds", "x", "--out", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_the_grid_bar_counts_this_sessions_rounds() -> None:
    """Rounds that ran in an earlier session move the bar without counting as work done now
    (checked on the bar's counts, not on tqdm's text)."""
    bar = GridProgress(8, enabled=True)
    bar.skip_to(4)  # two runs finished before
    assert (bar.bar.n, bar.bar.initial) == (4, 4)
    bar.ran(6, None)  # round 5 restored from a checkpoint, round 6 run now
    assert (bar.bar.n, bar.bar.initial) == (6, 5)
    bar.close()


def test_every_algorithm_has_its_own_curve_look() -> None:
    """curves.png of a full grid: no two algorithms drawn in the same colour and line style."""
    every = len(fedrir.algorithms.ALGORITHMS)
    assert len(set(line_looks(every))) == every
    looks = line_looks(40)
    assert len(set(looks)) == 40 and looks[0] != looks[10] and looks[0][0] == looks[10][0]
