"""The fault suite: bad inputs and faults, each with its exact outcome.

Every case in :data:`CASES` runs ``fedrir`` in-process next to a finished run (a copy per case)
and asserts: a non-zero exit, one line on stderr that names the problem (no traceback), and every
file that was there before unchanged (hashed before and after; a new run that failed leaves no
folder). The faults that need more than a command line (signals, concurrent writers, a full disk,
data changed under a run, Flower apps that fail or restart) are the tests after the table. Data is
tiny (digits, 2 clients, 2 rounds), so the whole file takes a few minutes on a busy 2-core machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedrir
import fedrir.cli
import fedrir.runs
from fedrir.config import KEYS, Config, with_overrides
from fedrir.errors import FedrirError
from fedrir.lock import folder_lock

SETTINGS = {
    "dataset": "digits",
    "clients": 2,
    "partition": "iid",
    "rounds": 2,
    "embed_dim": 16,
    "batch_size": 50,
    "precision": "fp32",
    "threads": 1,
}
COMPARED = (
    "final_accuracy",
    "best_accuracy",
    "best_round",
    "final_loss",
    "client_accuracy_std",
    "rounds",
    "bytes_uploaded",
    "bytes_downloaded",
    "precision",
    "parameters",
)
"""What an interrupted, then resumed run reports exactly as the uninterrupted one (times aside)."""


def flags(settings: dict[str, Any]) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A finished 2-round run, the reference every case's copy starts from."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert fedrir.cli.main(["run", "--quiet", *base(cache), "--out", str(out)]) == 0
    return out


def base(cache: Path) -> list[str]:
    return [*flags(SETTINGS), "--cache-dir", str(cache)]


def digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path → sha256 (folders → "dir")."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``fedrir argv`` in this process: exit status and stderr."""
    capsys.readouterr()
    try:
        code = fedrir.cli.main(argv)
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line(err: str, pattern: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedrir"), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])


# ----------------------------------------------------------------------------- the table

Prepare = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    """``fedrir`` arguments; ``{run}`` is the copy of the finished run, ``{tmp}`` the case's
    folder, ``{base}`` the tiny settings."""
    error: str
    """A regular expression the one error line must match."""
    prepare: Prepare | None = None
    leaves: bool = False
    """Whether the failure may leave new files (a run that diverged keeps what it wrote)."""


def run_with(*words: str, error: str, prepare: Prepare | None = None, **kw: Any) -> tuple:
    return (("run", "--quiet", "{base}", *words, "--out", "{tmp}/new"), error, prepare, kw)


INT_ZERO_INVALID = (
    "clients",
    "batch_size",
    "local_epochs",
    "embed_dim",
    "patch_size",
    "head_epochs",
    "ala_rand_percent",
    "as_align_batch_size",
    "rounds",
    "eval_every",
)
FLOAT_ZERO_INVALID = (
    "alpha",
    "train_ratio",
    "fraction",
    "lr",
    "dbe_momentum",
    "as_align_lr",
    "join_ratio",
)


def numeric_cases() -> list[Case]:
    """Every numeric key at the values it refuses: negative, NaN, inf, overflowing, and 0 where
    0 means nothing."""
    cases = []
    for name, key in KEYS.items():
        flag = "--" + name.replace("_", "-")
        if key.type is int:
            values = ["-1", str(10**20)] + ["0"] * (name in INT_ZERO_INVALID)
            values += ["nan"] * (name == "rounds")  # not an integer: argparse's own line
        elif key.type is float:
            values = ["-1", "nan", "inf"] + ["0"] * (name in FLOAT_ZERO_INVALID)
        else:
            continue
        for value in values:
            error = "invalid int value" if value == "nan" and key.type is int else f"'{name}'"
            argv = ("run", "{base}", f"{flag}={value}", "--out", "{tmp}/new")
            cases.append(Case(f"{name}={value}", argv, error))
    return cases


def write(relative: str, content: bytes | str) -> Prepare:
    def prepare(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return prepare


def idx(kind: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return b"\0\0" + bytes([kind, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + data


IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_folder(folder: str, broken: dict[int, bytes]) -> Prepare:
    """Four small Fashion-MNIST-format files (``broken`` replaces some by index)."""
    rng = np.random.default_rng(0)

    def files(n: int) -> list[bytes]:
        return [
            idx(0x08, (n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()),
            idx(0x08, (n,), (np.arange(n) % 10).astype(np.uint8).tobytes()),
        ]

    contents = files(300) + files(100)

    def prepare(tmp: Path) -> None:
        for i, name in enumerate(IDX_NAMES):
            path = tmp / folder / "fmnist" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(broken.get(i, contents[i]))

    return prepare


def in_run(action: Callable[[Path], None]) -> Prepare:
    """Act on the case's copy of the finished run."""
    return lambda tmp: action(tmp / "run")


def manifest(run: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / "checkpoint" / "manifest.json").read_text())
    return data


def client_file(run: Path, client: int) -> Path:
    return run / "checkpoint" / manifest(run)["clients"][str(client)]


def truncate(path_of: Callable[[Path], Path]) -> Prepare:
    def act(run: Path) -> None:
        path = path_of(run)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return in_run(act)


def delete(path_of: Callable[[Path], Path]) -> Prepare:
    return in_run(lambda run: path_of(run).unlink())


def swap_clients(run: Path) -> None:
    shutil.copyfile(client_file(run, 0), client_file(run, 1))


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Prepare:
    def act(run: Path) -> None:
        data = manifest(run)
        change(data)
        (run / "checkpoint" / "manifest.json").write_text(json.dumps(data))

    return in_run(act)


def edit_config(old: str, new: str) -> Prepare:
    def act(run: Path) -> None:
        path = run / "config.toml"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))

    return in_run(act)


def server_file(run: Path) -> Path:
    return run / "checkpoint" / manifest(run)["server"]


RESUME = ("run", "--resume", "{run}", "--rounds", "3")

TABLE: list[tuple[str, tuple[str, ...], str, Prepare | None, dict[str, Any]]] = [
    # names
    ("algorithm", *run_with("--algorithm", "bogus", error="bogus")),
    ("dataset", *run_with("--dataset", "bogus", error="bogus")),
    ("partition", *run_with("--partition", "bogus", error="'partition'|bogus")),
    ("uplink", *run_with("--uplink", "bogus", error="'uplink'")),
    ("downlink", *run_with("--downlink", "topk:2", error="'downlink'")),
    ("idm", *run_with("--idm", "bogus", error="'idm'")),
    ("optimizer", *run_with("--optimizer", "rmsprop", error="'optimizer'")),
    ("engine", *run_with("--engine", "ray", error="'engine'")),
    ("precision", *run_with("--precision", "fp16", error="'precision'")),
    ("device", *run_with("--device", "tpu", error="'device'")),
    ("mcsl-without-idm-none", *run_with("--no-mcsl", error="'idm'")),
    ("too-many-classes", *run_with("--partition", "pat", "--classes-per-client", "11", error="")),
    ("too-many-clients", *run_with("--clients", "5000", error="client")),
    ("no-client-ever-trains", *run_with("--dropout", "0.9999", error="no client trains")),
    (
        "compare-algorithm",
        ("compare", "{base}", "--algorithms", "fedrir,bogus", "--out", "{tmp}/grid"),
        "bogus",
        None,
        {},
    ),
    (
        "compare-seeds",
        ("compare", "{base}", "--algorithms", "fedavg", "--seeds", "0,0", "--out", "{tmp}/g"),
        "distinct",
        None,
        {},
    ),
    (
        "compare-seeds-text",
        ("compare", "{base}", "--algorithms", "fedavg", "--seeds", "x", "--out", "{tmp}/g"),
        "--seeds",
        None,
        {},
    ),
    (
        "compare-into-a-run",
        ("compare", "{base}", "--algorithms", "fedavg", "--seeds", "0", "--out", "{run}"),
        "holds no compare",
        None,
        {},
    ),
    ("compare-out-empty", ("compare", "--algorithms", "fedavg", "--out", ""), "--out", None, {}),
    # paths
    ("out-empty", ("run", "{base}", "--out", ""), "--out is empty", None, {}),
    ("config-empty", ("run", "--config", "", "--out", "{tmp}/new"), "--config is empty", None, {}),
    ("config-missing", ("run", "--config", "{tmp}/no.toml"), "cannot read config file", None, {}),
    ("config-is-a-folder", ("run", "--config", "{tmp}"), "cannot read config file", None, {}),
    ("out-is-a-file", ("run", "{base}", "--out", "{run}/config.toml"), "is a file", None, {}),
    ("out-under-a-file", ("run", "{base}", "--out", "{run}/config.toml/x"), "cannot", None, {}),
    ("out-holds-a-run", ("run", "{base}", "--out", "{run}"), "already holds a run", None, {}),
    (
        "out-not-empty",
        ("run", "{base}", "--out", "{tmp}/junk"),
        "not empty",
        write("junk/notes.txt", "mine"),
        {},
    ),
    ("resume-nothing", ("run", "--resume", "{tmp}/nothing"), "holds no run", None, {}),
    ("resume-empty", ("run", "--resume", ""), "--resume is empty", None, {}),
    ("resume-with-flags", ("run", "--resume", "{run}", "--lr", "0.1"), "only --rounds", None, {}),
    ("resume-shorter", ("run", "--resume", "{run}", "--rounds", "1"), "already run 2", None, {}),
    (
        "heatmap-not-png",
        ("partition", "--dataset", "digits", "--heatmap", "{tmp}/h.txt"),
        "not a .png",
        None,
        {},
    ),
    # TOML files
    *(
        (
            f"toml-{name}",
            ("run", "--config", "{tmp}/c.toml", "--out", "{tmp}/new"),
            error,
            write("c.toml", text),
            {},
        )
        for name, text, error in [
            ("malformed", "rounds = = 2\n", "not valid TOML"),
            ("wrong-type", 'rounds = "two"\n', "expected int"),
            ("bool-for-int", "rounds = true\n", "expected int"),
            ("unknown-key", "bogus = 1\n", "unknown top-level key 'bogus'"),
            ("unknown-section-key", "[train]\nbogus = 1\n", "unknown key 'train.bogus'"),
            ("wrong-section", "lr = 0.1\n", r"belongs in \[train\]"),
            ("section-not-table", "train = 3\n", "must be a table"),
            ("nan", "[train]\nlr = nan\n", "'lr'"),
            ("not-utf8", b"rounds = 2 # \xff\xfe\n", "not UTF-8"),
        ]
    ),
    # datasets
    ("cifar-missing", *run_with("--dataset", "cifar10", "--data-dir", "{tmp}/d", error="")),
    (
        "fmnist-garbage",
        *run_with(
            "--dataset",
            "fmnist",
            "--data-dir",
            "{tmp}/d",
            error="not an idx file",
            prepare=idx_folder("d", {0: b"garbage, not idx"}),
        ),
    ),
    (
        "fmnist-truncated",
        *run_with(
            "--dataset",
            "fmnist",
            "--data-dir",
            "{tmp}/d",
            error="truncated|fetch it again",
            prepare=idx_folder("d", {2: idx(0x08, (100, 28, 28), b"\0" * 999)}),
        ),
    ),
    (
        "fmnist-labels-mismatch",
        *run_with(
            "--dataset",
            "fmnist",
            "--data-dir",
            "{tmp}/d",
            error="",
            prepare=idx_folder("d", {1: idx(0x08, (7,), b"\0" * 7)}),
        ),
    ),
    (
        "images-garbage",
        *run_with(
            "--dataset",
            "officecaltech10",
            "--data-dir",
            "{tmp}/d",
            error="cannot read image",
            prepare=write("d/officecaltech10/amazon/mug/1.jpg", b"not a jpeg"),
        ),
    ),
    (
        "images-empty",
        *run_with(
            "--dataset",
            "officecaltech10",
            "--data-dir",
            "{tmp}/d",
            error="no images",
            prepare=write("d/officecaltech10/amazon/mug/readme.txt", "no images here"),
        ),
    ),
    ("pfllib-needs-pickle", *run_with("--dataset", "pfllib", "--data-dir", "{tmp}", error="")),
    # checkpoints
    ("ckpt-client-truncated", RESUME, "unusable", truncate(lambda r: client_file(r, 1)), {}),
    ("ckpt-client-deleted", RESUME, "missing", delete(lambda r: client_file(r, 0)), {}),
    ("ckpt-client-swapped", RESUME, "swapped", in_run(swap_clients), {}),
    ("ckpt-server-deleted", RESUME, "server", delete(server_file), {}),
    ("ckpt-server-truncated", RESUME, "server", truncate(server_file), {}),
    (
        "ckpt-manifest-truncated",
        RESUME,
        "manifest .* unreadable",
        truncate(lambda r: r / "checkpoint" / "manifest.json"),
        {},
    ),
    (
        "ckpt-manifest-deleted",
        RESUME,
        "without its checkpoint",
        delete(lambda r: r / "checkpoint" / "manifest.json"),
        {},
    ),
    ("ckpt-other-settings", RESUME, "other settings", edit_config("lr = 0.0005", "lr = 0.01"), {}),
    ("ckpt-config-garbage", RESUME, "not valid TOML", edit_config("rounds =", "rounds = ="), {}),
    (
        "ckpt-other-runtime",
        RESUME,
        "precision changed from 'bf16' to 'fp32'",
        edit_manifest(lambda m: m["setting"].update(precision="bf16")),
        {},
    ),
    (
        "ckpt-other-data",
        RESUME,
        "data changed",
        edit_manifest(lambda m: m["setting"].update(data="0" * 32)),
        {},
    ),
    # divergence: the run stops at the first non-finite number
    (
        "divergence",
        *run_with(
            "--lr",
            "1e6",
            "--optimizer",
            "sgd",
            error=r"diverged in round 1: client 0's",
            leaves=True,
        ),
    ),
]

CASES = numeric_cases() + [
    Case(id_, argv, error, prepare, **kw) for id_, argv, error, prepare, kw in TABLE
]


def test_the_table_is_large() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_fault_is_one_line_and_changes_no_file(
    case: Case, finished: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(finished, tmp_path / "run")
    if case.prepare is not None:
        case.prepare(tmp_path)
    before = digests(tmp_path)
    argv = []
    for word in case.argv:
        if word == "{base}":
            argv += base(cache)
        else:
            argv.append(word.format(run=tmp_path / "run", tmp=tmp_path))
    code, err = call(argv, capsys)
    assert code != 0
    assert_one_line(err, case.error)
    after = digests(tmp_path)
    if case.leaves:
        after = {k: v for k, v in after.items() if k in before}
    assert after == before


# ----------------------------------------------------------------------------- faults beyond a line


def resumed_equals(out: Path, finished: Path) -> None:
    reference = json.loads((finished / "summary.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert {k: summary[k] for k in COMPARED} == {k: reference[k] for k in COMPARED}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["accuracy"], r["loss"]) for r in rows] == [
        (r["round"], r["accuracy"], r["loss"]) for r in ref
    ]


def test_ctrl_c_after_round_1_then_resume_gives_the_same_summary(
    finished: Path,
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = fedrir.cli.run

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def stop(_: object, round_: int) -> None:
            if round_ == 1:
                raise KeyboardInterrupt

        return real(*args, **kwargs, on_round=stop)

    monkeypatch.setattr(fedrir.cli, "run", interrupted)
    out = tmp_path / "run"
    code, err = call(["run", "--quiet", *base(cache), "--out", str(out)], capsys)
    assert code == 130
    assert_one_line(err, f"interrupted; continue with: fedrir run --resume {out}$")
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    assert call(["run", "--quiet", "--resume", str(out)], capsys)[0] == 0
    resumed_equals(out, finished)


KILLED_AT = """
import os, signal, sys
import fedrir

def kill(record, round_):
    if round_ == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)

fedrir.run(fedrir.load_config(sys.argv[1]), out=sys.argv[2], on_round=kill)
"""
"""A run that kills itself right after round argv[3] (its checkpoint written): a known point."""


@pytest.mark.parametrize("round_", [1, 2])
def test_sigkill_then_resume_gives_the_same_summary(
    round_: int, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = [str(finished / "config.toml"), str(out), str(round_)]
    proc = subprocess.run([sys.executable, "-c", KILLED_AT, *argv], env=os.environ | {})
    assert proc.returncode == -signal.SIGKILL
    assert manifest(out)["round"] == round_ and not (out / "summary.json").exists()
    assert (out / ".lock").exists()  # left by the killed process, and no obstacle
    assert call(["run", "--quiet", "--resume", str(out)], capsys)[0] == 0
    resumed_equals(out, finished)
    assert not (out / ".lock").exists()


HOLDER = """
import contextlib, sys
from pathlib import Path
from fedrir.lock import folder_lock

with contextlib.ExitStack() as held:
    for folder in sys.argv[1:]:
        held.enter_context(folder_lock(Path(folder)))
    print("held", flush=True)
    sys.stdin.read()
"""
"""Another process that holds the folders named on its command line until its stdin closes."""


def test_a_second_writer_stops_at_once_naming_the_other_process(
    finished: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, grid, new = tmp_path / "run", tmp_path / "grid", tmp_path / "new"
    shutil.copytree(finished, run)
    grid.mkdir()
    new.mkdir()
    attempts = {
        run: ["run", "--resume", str(run), "--rounds", "3"],
        new: ["run", *base(cache), "--out", str(new)],
        grid: ["compare", *base(cache), "--algorithms", "fedavg", "--out", str(grid)],
    }
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, attempts)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = digests(tmp_path)
        for folder, argv in attempts.items():
            code, err = call(argv, capsys)
            assert code == 2
            pattern = f"{folder} is in use by another fedrir process \\(pid {holder.pid} "
            assert_one_line(err, pattern)
        assert digests(tmp_path) == before
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()


def test_runs_started_together_get_their_own_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names chosen in the same second: each is claimed (mkdir) as it is chosen."""
    monkeypatch.chdir(tmp_path)
    config = with_overrides(Config(), SETTINGS)
    first, second = (fedrir.runs.new_out_dir(config, "auto") for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
    with folder_lock(first), pytest.raises(FedrirError, match="in use by another fedrir"):
        fedrir.run(config, out=first)


def test_the_same_folder_is_refused_to_a_second_writer_in_this_process(
    cache: Path, tmp_path: Path
) -> None:
    config = with_overrides(Config(), {**SETTINGS, "cache_dir": str(cache), "rounds": 1})
    out = tmp_path / "run"

    def second_writer(_: object, round_: int) -> None:
        with pytest.raises(FedrirError, match="in use by another fedrir"):
            fedrir.run(config, out=out)
        with pytest.raises(FedrirError, match="in use by another fedrir"):
            fedrir.resume(out)

    fedrir.run(config, out=out, on_round=second_writer)
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1


def test_a_compare_refuses_a_cell_extended_since(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = tmp_path / "grid"
    argv = ["compare", "--quiet", *base(cache), "--rounds=1", "--algorithms", "fedavg"]
    argv += ["--seeds", "0", "--out", str(grid)]
    assert call(argv, capsys)[0] == 0
    cell = grid / "runs" / "fedavg-seed0"
    assert call(["run", "--quiet", "--resume", str(cell), "--rounds", "2"], capsys)[0] == 0
    before = digests(tmp_path)
    code, err = call(argv, capsys)
    assert code == 2
    assert_one_line(err, f"the run in {cell} differs from the grid \\(rounds: 2 there, 1 here")
    assert digests(tmp_path) == before


def test_resume_on_changed_data_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The files under --data-dir replaced by others of the same shape and labels."""
    idx_folder("d", {})(tmp_path)
    settings = {**SETTINGS, "dataset": "fmnist", "data_dir": str(tmp_path / "d"), "rounds": 1}
    settings["cache_dir"] = str(tmp_path / "cache")
    out = tmp_path / "run"
    assert call(["run", "--quiet", *flags(settings), "--out", str(out)], capsys)[0] == 0
    images = tmp_path / "d" / "fmnist" / IDX_NAMES[0]
    raw = bytearray(images.read_bytes())
    raw[-784:] = bytes(255 - b for b in raw[-784:])  # the last image, inverted
    images.write_bytes(bytes(raw))
    before = digests(out)
    code, err = call(["run", "--quiet", "--resume", str(out), "--rounds", "2"], capsys)
    assert code == 2
    assert_one_line(err, "cannot resume .*the clients' data changed")
    assert digests(out) == before


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(
    finished: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for round 1's checkpoint (two client states and the server), not for round 2's too
    size = sum(p.stat().st_size for p in (finished / "checkpoint").iterdir()) * 3 // 2
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?)")
    try:
        out = disk / "run"
        code, err = call(["run", "--quiet", *base(cache), "--out", str(out)], capsys)
        assert code == 2
        assert_one_line(err, f"the disk holding {out} is full.*fedrir run --resume {out}$")
        assert manifest(out)["round"] == 1
        named = {"manifest.json", manifest(out)["server"], *manifest(out)["clients"].values()}
        assert {p.name for p in (out / "checkpoint").iterdir()} == named
        assert not list(out.glob(".*.tmp"))
        shutil.copytree(out, tmp_path / "moved", ignore=shutil.ignore_patterns(".lock"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert call(["run", "--quiet", "--resume", str(tmp_path / "moved")], capsys)[0] == 0
    resumed_equals(tmp_path / "moved", finished)


def test_result_files_are_strict_json(finished: Path) -> None:
    def strict(text: str) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite {c}"))

    summary = strict((finished / "summary.json").read_text())
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    for line in (finished / "metrics.jsonl").read_text().splitlines():
        strict(line)
    strict((finished / "checkpoint" / "manifest.json").read_text())


def test_wall_seconds_after_a_resume_counts_every_process(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = manifest(run)["wall_seconds"]
    assert before > 0
    assert call(["run", "--quiet", "--resume", str(run), "--rounds", "3"], capsys)[0] == 0
    assert json.loads((run / "summary.json").read_text())["wall_seconds"] > before


# ----------------------------------------------------------------------------- Flower


def test_flower_divergence_is_the_same_line(cache: Path, tmp_path: Path) -> None:
    from test_flower import LoopbackGrid, _task_identity

    from fedrir.flower.app import make_client_app, serve

    cfg = with_overrides(
        Config(engine="flower"),
        {**SETTINGS, "cache_dir": str(cache), "lr": 1e6, "optimizer": "sgd"},
    )
    grid = LoopbackGrid(make_client_app(lambda _: cfg), 2)
    with _task_identity(), pytest.raises(FedrirError) as raised:
        serve(grid, cfg, tmp_path / "run", timeout=5.0)
    assert re.fullmatch(r"the run diverged in round 1: client 0's .*", str(raised.value))
    sim = with_overrides(cfg, {"engine": "sim"})
    with pytest.raises(FedrirError) as in_process:
        fedrir.run(sim, out=None)
    assert str(in_process.value) == str(raised.value)


def test_flower_client_app_raising_is_left_out_of_its_rounds(cache: Path, tmp_path: Path) -> None:
    """A ClientApp that raises on every message after connecting is left out of every round
    (counted as such in each record); the run goes on with the others."""
    from test_flower import LoopbackGrid, _task_identity

    from fedrir.flower.app import make_client_app, serve

    cfg = with_overrides(Config(engine="flower"), {**SETTINGS, "cache_dir": str(cache)})
    connected: set[int] = set()

    def failing(context: Any) -> Config:
        partition = int(context.node_config["partition-id"])
        if partition == 1 and partition in connected:
            raise RuntimeError("disk on fire")
        connected.add(partition)
        return cfg

    grid = LoopbackGrid(make_client_app(failing, tmp_path / "states"), 2)
    with _task_identity():
        result = serve(grid, cfg, tmp_path / "run", timeout=5.0)
    assert [(r.selected, r.participants, r.evaluated) for r in result.history] == [(2, 1, 1)] * 2


def test_flower_server_app_restarted_continues_to_the_same_numbers(
    cache: Path, tmp_path: Path
) -> None:
    from test_flower import LoopbackGrid, _task_identity

    from fedrir.flower.app import make_client_app, serve

    cfg = with_overrides(Config(engine="flower"), {**SETTINGS, "cache_dir": str(cache)})
    app = make_client_app(lambda _: cfg, tmp_path / "states")
    out = tmp_path / "run"

    def killed(_: object, round_: int) -> None:
        if round_ == 1:
            raise FedrirError("the ServerApp died")

    with _task_identity():
        with pytest.raises(FedrirError, match="died"):
            serve(LoopbackGrid(app, 2), cfg, out, timeout=5.0, on_round=killed)
        assert manifest(out)["round"] == 1
        resumed = serve(LoopbackGrid(app, 2), cfg, out, timeout=5.0, resume=True)
    uninterrupted = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    assert [(r.round, r.accuracy, r.loss) for r in resumed.history] == [
        (r.round, r.accuracy, r.loss) for r in uninterrupted.history
    ]
