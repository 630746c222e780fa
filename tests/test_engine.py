"""The in-process engine end to end on real MNIST: learning, determinism, files, resume, errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedrir
import fedrir.cli
from fedrir.cli import main
from fedrir.config import Config, with_overrides
from fedrir.engine.rounds import plan_round
from fedrir.errors import FedrirError
from fedrir.results import read_metrics


def small(cache: Path, **overrides: Any) -> Config:
    """Real MNIST, 4 % of it, 5 clients with 2 classes each: seconds per round.

    The paper's IDM loss (``club``) learns in a few steps; the reference code's (``nll``) needs
    far more steps than a test can afford before the classifier catches up.
    """
    base = {
        "fraction": 0.04,
        "clients": 5,
        "partition": "pat",
        "rounds": 3,
        "batch_size": 20,
        "embed_dim": 64,
        "idm": "club",
        "cache_dir": str(cache),
        "precision": "fp32",  # the thresholds hold whether or not the CPU has BF16
    }
    return with_overrides(Config(), base | overrides)


def test_fedrir_learns_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = fedrir.run(small(tmp_path), out=out)
    s = result.summary
    assert s["final_accuracy"] > 0.75  # 2 classes per client: chance is 50 % (measured: 0.83)
    assert s["final_accuracy"] == result.history[-1].accuracy
    best = max(result.history, key=lambda r: r.accuracy)
    assert (s["best_accuracy"], s["best_round"]) == (best.accuracy, best.round)
    assert s["rounds"] == 3 and len(result.history) == 3
    for name in ("config.toml", "metrics.jsonl", "summary.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert fedrir.load_config(out / "config.toml") == small(tmp_path)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert {
        "round",
        "accuracy",
        "loss",
        "client_accuracies",
        "bytes_up",
        "bytes_down",
        "seconds",
    } <= set(rows[0])
    assert len(rows[0]["client_accuracies"]) == 5
    # only the GFE travels: 5 uploads and 5 downloads of its parameters per round
    gfe = s["parameters"]["shared"] * 4
    assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 5 * gfe
    assert s["bytes_uploaded"] == 3 * 5 * gfe
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] == s["final_accuracy"]


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=2)
    a = fedrir.run(cfg, out=None)
    b = fedrir.run(cfg, out=None)
    c = fedrir.run(with_overrides(cfg, {"seed": 1}), out=None)
    assert [r.client_accuracies for r in a.history] == [r.client_accuracies for r in b.history]
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.loss for r in a.history] != [r.loss for r in c.history]


def test_eval_every_dropout_and_partial_participation(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=4, eval_every=3, join_ratio=0.6, dropout=0.3, seed=3)
    result = fedrir.run(cfg, out=None)
    assert [r.round for r in result.history] == [3, 4]  # every 3rd round, and the last
    plans = [plan_round(cfg, r, 5) for r in range(1, 5)]
    assert all(len(p.selected) == 3 for p in plans)
    assert [len(p.participants) for p in plans[2:]] == [r.participants for r in result.history]
    assert any(p.dropped for p in plans)  # this seed drops someone: the test means something


def test_random_join_count_varies() -> None:
    cfg = with_overrides(Config(), {"join_ratio": 0.25, "random_join": True})
    counts = {len(plan_round(cfg, r, 20).selected) for r in range(1, 30)}
    assert min(counts) >= 5 and max(counts) <= 20 and len(counts) > 3


KILLED_AFTER_ROUND = """
import os, signal, sys
import fedrir

def kill(record, round_):
    if round_ == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

fedrir.run(fedrir.load_config(sys.argv[1]), out=sys.argv[2], on_round=kill)
"""
"""A run that kills itself (SIGKILL) right after round argv[3] and its checkpoint: a known point,
whatever the machine's speed."""


def test_resume_after_kill_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = small(tmp_path, rounds=3)
    reference = fedrir.run(cfg, out=tmp_path / "reference").summary
    out = tmp_path / "killed"
    config = str(tmp_path / "reference" / "config.toml")
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_ROUND, config, str(out), "1"])
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "checkpoint" / "manifest.json").read_text())["round"] == 1
    assert not (out / "summary.json").exists()
    resumed = fedrir.resume(out).summary
    for key in (
        "final_accuracy",
        "best_accuracy",
        "client_accuracy_std",
        "final_loss",
        "bytes_uploaded",
        "bytes_downloaded",
        "rounds",
    ):
        assert resumed[key] == reference[key], key
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert [r["accuracy"] for r in rows] == [
        r["accuracy"] for r in read_metrics(tmp_path / "reference" / "metrics.jsonl")
    ]


def test_resume_can_extend_a_finished_run_but_not_shorten_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fedrir.run(small(tmp_path, rounds=2), out=out)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FedrirError, match="already run 2 rounds"):
        fedrir.resume(out, rounds=1)
    assert (out / "metrics.jsonl").read_text() == before
    longer = fedrir.resume(out, rounds=3)
    assert [r.round for r in longer.history] == [1, 2, 3]
    # without its checkpoint a finished run is refused, not redone over its own results
    shutil.rmtree(out / "checkpoint")
    summary = (out / "summary.json").read_text()
    with pytest.raises(FedrirError, match="finished run without its checkpoint"):
        fedrir.resume(out, rounds=4)
    assert (out / "summary.json").read_text() == summary


def test_a_run_killed_before_its_first_checkpoint_restarts_to_the_same_summary(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    reference = fedrir.run(small(tmp_path, rounds=2, checkpoint_every=5), out=out).summary
    # as if killed after round 2's metrics line, before the (final) checkpoint was written
    shutil.rmtree(out / "checkpoint")
    (out / "summary.json").unlink()
    resumed = fedrir.resume(out).summary
    for key in ("final_accuracy", "client_accuracy_std", "bytes_uploaded", "rounds"):
        assert resumed[key] == reference[key], key
    assert [r["round"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_resume_without_a_checkpoint_keeps_the_results(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fedrir.run(small(tmp_path, rounds=1, checkpoint_every=0), out=out)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FedrirError, match="no checkpoint"):
        fedrir.resume(out, rounds=2)
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--rounds", "0"], "invalid value for 'rounds'"),
        (["run", "--algorithm", "fedfoo"], "unknown algorithm 'fedfoo'"),
        (["run", "--dataset", "imagenet"], "imagenet"),
        (["run", "--config", "/nonexistent.toml"], "cannot read config file"),
        (["run", "--resume", "/nonexistent-run"], "holds no run to resume"),
        (["run", "--alpha", "-0.1"], "invalid value for 'alpha'"),
        (["run", "--device", "tpu"], "invalid value for 'device'"),
        (["run", "--device", "cuda:abc"], "invalid value for 'device'"),
        (["run", "--lr", "inf"], "invalid value for 'lr'"),
        (["run", "--idm-weight", "nan"], "invalid value for 'idm_weight'"),
        (["run", "--out", __file__], "is a file, not a folder"),
        (["compare", "--algorithms", "fedavg", "--out", __file__], "not a folder"),
        (["run", "--resume", "/nonexistent-run", "--out", "x"], "only --rounds may be changed"),
        (["run", "--resume", ""], "--resume is empty"),
        (["run", "--data-dir", "/nonexistent-data"], "/nonexistent-data is not a folder"),
        (["partition", "--heatmap", "labels.svg"], "not a .png path"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedrir: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_an_existing_run_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    fedrir.run(small(tmp_path, rounds=1), out=out)
    before = (out / "summary.json").read_text()
    assert main(["run", "--out", str(out), "--rounds", "1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before


def test_a_folder_that_is_not_a_run_is_never_written_into(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("my own notes")
    assert main(["run", "--out", str(mine), "--rounds", "1"]) == 2
    assert "not empty and holds no run" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["summary.json"]
    assert (mine / "summary.json").read_text() == "my own notes"


def test_an_existing_flower_run_is_refused_before_flower_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fedrir.run(small(tmp_path, rounds=1), out=out)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(FedrirError, match="already holds a run; continue it with --resume"):
        fedrir.run(small(tmp_path, rounds=1, engine="flower"), out=out)
    assert (out / "metrics.jsonl").read_text() == before


def test_a_checkpoint_is_resumed_only_under_its_own_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fedrir.run(small(tmp_path, rounds=1), out=out)
    before = (out / "metrics.jsonl").read_text()
    config_toml = out / "config.toml"
    original = config_toml.read_text()
    config_toml.write_text(original.replace("lr = 0.0005", "lr = 0.001"))
    with pytest.raises(FedrirError, match=r"written under other settings .* edited"):
        fedrir.resume(out, rounds=2)
    assert (out / "metrics.jsonl").read_text() == before
    config_toml.write_text(original)
    manifest = out / "checkpoint" / "manifest.json"
    intact = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: v for k, v in intact.items() if k != "history"}))
    with pytest.raises(FedrirError, match="not a fedrir checkpoint manifest"):
        fedrir.resume(out, rounds=2)
    manifest.write_text(json.dumps(intact))
    assert [r.round for r in fedrir.resume(out, rounds=2).history] == [1, 2]


def test_ctrl_c_names_the_folder_to_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fedrir.cli, "run", interrupted)
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"fedrir: interrupted; continue with: fedrir run --resume {out}"
    )
