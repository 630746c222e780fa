"""Accuracy against bytes: FedRIR and FedAvg with compressed uploads, on MNIST and Fashion-MNIST.

The scale of ``benchmarks/RESULTS.md`` (a stratified 10 % of each dataset, 20 clients, Dirichlet
α = 0.1 redrawn until every client has 50 samples, 100 rounds, every client in every round), the
downlink uncompressed, and the uplink codecs ``none``, ``fp16``, ``int8``, ``topk:0.01+int8`` and
``topk:0.001+int8`` (top-k with error feedback). Each dataset is one ``fedrir compare --codecs``
grid under ``--out``, resumable: finished runs are skipped, interrupted ones continue from their
checkpoint, and seeds are added one at a time across the datasets, so that the first hours give
seed 0 everywhere. The records of finished runs are committed (not their checkpoints).

It writes the section between the markers in ``benchmarks/RESULTS.md`` (final accuracy mean ± std
over the seeds measured so far, the gap to ``none``, MB per round each way, the compression ratio,
the codec's share of the round time, against the targets: ``int8`` ≥ 3.9× fewer upload bytes
within 0.3 points of ``none``, top-k 1 % + ``int8`` ≥ 100× within 1 point) and
``benchmarks/communication/accuracy_vs_mb.png`` (accuracy against cumulative MB uploaded).

    python benchmarks/communication.py                              # the committed figures
    python benchmarks/communication.py --datasets mnist --seeds 0   # what fits in a session
    python benchmarks/communication.py --report-only                # the section from the records
    python benchmarks/communication.py --seeds 0 --rounds 2 --fraction 0.02 --min-samples 20 \\
        --out /tmp/comm --results /tmp/comm/RESULTS.md             # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from fedrir.compare import RESULTS_CSV, check_codecs, compare, parse_seeds, run_dir
from fedrir.config import Config, with_overrides
from fedrir.errors import FedrirError
from fedrir.results import line_looks, read_metrics

CODECS = "none,fp16,int8,topk:0.01+int8,topk:0.001+int8"
TARGETS = {"int8": (3.9, 0.3), "topk:0.01+int8": (100.0, 1.0)}
"""Codec → (at least this many times fewer upload bytes, at most this many points below ``none``;
a codec that ends above ``none`` has lost nothing)."""
START, END = "<!-- benchmarks/communication.py -->", "<!-- /benchmarks/communication.py -->"
"""The markers around the section this script writes in RESULTS.md (kept by compare_grid.py)."""
PLOT = "accuracy_vs_mb.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fmnist")
    parser.add_argument("--algorithms", default="fedavg,fedrir")
    parser.add_argument("--codecs", default=CODECS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--min-samples", type=int, default=50)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run (default 1: on shared cores two threads wait on each other)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/communication"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument(
        "--report-only", action="store_true", help="write the section from the finished runs"
    )
    args = parser.parse_args()
    seeds, codecs = parse_seeds(args.seeds), check_codecs(args.codecs.split(","))
    datasets, algorithms = args.datasets.split(","), args.algorithms.split(",")
    base = with_overrides(
        Config(),
        {
            "rounds": args.rounds,
            "fraction": args.fraction,
            "clients": 20,
            "partition": "dir",
            "alpha": 0.1,
            "min_samples": args.min_samples,
            "eval_every": 1,
            "checkpoint_every": 10,
            "threads": args.threads,
        },
    )
    if not args.report_only:
        for done in range(1, len(seeds) + 1):
            for dataset in datasets:
                config = with_overrides(base, {"dataset": dataset})
                out = grid(args.out, dataset)
                compare(config, algorithms, seeds[:done], out, True, codecs=codecs)
    given = [a for a in sys.argv[1:] if a != "--report-only"]
    command = shlex.join(["python", "benchmarks/communication.py", *given])
    found = {d: finished_runs(grid(args.out, d), algorithms, codecs, seeds) for d in datasets}
    plot(found, args.out / PLOT)
    write_section(args.results, section(found, command, args, base))


def grid(out: Path, dataset: str) -> Path:
    return out / f"{dataset}-dir"


Runs = dict[tuple[str, str], dict[int, tuple[dict[str, Any], list[dict[str, Any]]]]]
"""(algorithm, codec) → seed → that finished run's summary and metrics."""


def finished_runs(out: Path, algorithms: list[str], codecs: list[str], seeds: list[int]) -> Runs:
    """The finished runs of a grid, whatever the grid's progress (none yet: empty)."""
    runs: Runs = {}
    for a in algorithms:
        for c in codecs:
            folders = {s: run_dir(out, a, s, c) for s in seeds}
            runs[a, c] = {
                s: (json.loads((f / "summary.json").read_text()), read_metrics(f / "metrics.jsonl"))
                for s, f in folders.items()
                if (f / "summary.json").exists()
            }
    return runs


def unfinished(out: Path, algorithm: str, codec: str, seeds: list[int], rounds: int) -> str:
    """The rest of a table row for a cell without a finished seed: how far its first started
    seed got, and its bytes, ratio and codec share over the rounds recorded so far."""
    for s in seeds:
        metrics = run_dir(out, algorithm, s, codec) / "metrics.jsonl"
        rows = read_metrics(metrics) if metrics.exists() else []
        if rows:
            last = rows[-1]
            up = statistics.fmean(r["bytes_up"] for r in rows)
            down = statistics.fmean(r["bytes_down"] for r in rows)
            ratio = sum(r["raw_bytes_up"] for r in rows) / sum(r["bytes_up"] for r in rows)
            share = sum(r["codec_seconds"] for r in rows) / sum(r["seconds"] for r in rows)
            return (
                f"unfinished: seed {s} at {100 * last['accuracy']:.2f} after round "
                f"{last['round']} of {rounds} | | {up / 1e6:.3f} | {down / 1e6:.3f} "
                f"| {ratio:.1f}× | {100 * share:.1f} % | |"
            )
    return "not run yet | | | | | | |"


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def section(found: dict[str, Runs], command: str, args: argparse.Namespace, base: Config) -> str:
    lines = [
        "## Communication: accuracy against bytes",
        "",
        f"Produced by `{command}`; each dataset is one `fedrir compare --codecs` grid under "
        f"`{args.out}/<dataset>-dir/` (its `{RESULTS_CSV}` has every column), and "
        f"`{args.out / PLOT}` plots accuracy against cumulative MB uploaded.",
        f"Scale as above (a stratified {base.data.fraction:.0%} of each dataset, 20 clients, "
        f"Dirichlet α = {base.data.alpha}, at least {base.data.min_samples} samples per client, "
        f"{base.rounds} rounds, {base.threads or 'all'} thread(s) per run); the downlink is not "
        "compressed. Upload bytes are the encoded "
        "bytes (values, indices, scales, headers) all clients send per round; ratio = bytes "
        "without the codec / with it; codec = encoding and decoding's share of the round time. "
        "Δ is the final accuracy's gap to `none` on the same seeds, in points. Accuracies in %, "
        "mean ± sample std over the seeds finished so far.",
        "",
        "| dataset | algorithm | uplink | seeds | final acc (%) | Δ vs none | up MB / round "
        "| down MB / round | ratio up | codec share | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for dataset, runs in found.items():
        for (algorithm, codec), done in runs.items():
            if not done:
                where = grid(args.out, dataset)
                state = unfinished(where, algorithm, codec, parse_seeds(args.seeds), base.rounds)
                lines.append(f"| {dataset} | {algorithm} | {codec} | 0 | {state}")
                continue
            summaries = [s for s, _ in done.values()]
            final = [100 * s["final_accuracy"] for s in summaries]
            reference = runs.get((algorithm, "none"), {})
            common = sorted(set(done) & set(reference))  # the gap on the same seeds only
            gap = ""
            if common:
                gaps = [
                    100 * (done[s][0]["final_accuracy"] - reference[s][0]["final_accuracy"])
                    for s in common
                ]
                gap = f"{statistics.fmean(gaps):+.2f}"
            raw = sum(s["raw_bytes_uploaded"] for s in summaries)
            sent = sum(s["bytes_uploaded"] for s in summaries)
            ratio = raw / sent
            up = statistics.fmean(s["bytes_uploaded_per_round"] for s in summaries) / 1e6
            down = statistics.fmean(s["bytes_downloaded"] / s["rounds"] for s in summaries) / 1e6
            share = statistics.fmean(s["codec_share"] for s in summaries)
            verdict = ""
            if codec in TARGETS and gap:
                fewer, points = TARGETS[codec]
                met = ratio >= fewer and float(gap) >= -points
                verdict = f"{'met' if met else 'missed'} (≥ {fewer:g}×, ≥ −{points:g})"
            lines.append(
                f"| {dataset} | {algorithm} | {codec} | {len(done)} | {_mean_std(final)} "
                f"| {gap} | {up:.3f} | {down:.3f} | {ratio:.1f}× | {100 * share:.1f} % "
                f"| {verdict} |"
            )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the markers in ``path`` (appended the first time)."""
    current = path.read_text() if path.exists() else ""
    block = f"{START}\n{text}{END}\n"
    if START in current and END in current:
        head, _, rest = current.partition(START)
        _, _, tail = rest.partition(END)
        current = head + block + tail.lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.write_text(current)


def plot(found: dict[str, Runs], path: Path) -> None:
    """Accuracy against cumulative MB uploaded, mean over finished seeds, one panel per dataset."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(found), 4.5))
    axes = fig.subplots(1, len(found), squeeze=False)[0]
    for ax, (dataset, runs) in zip(axes, found.items(), strict=True):
        done = {cell: seeds for cell, seeds in runs.items() if seeds}
        for ((algorithm, codec), seeds), (colour, style) in zip(
            done.items(), line_looks(len(done)), strict=True
        ):
            rows = [metrics for _, metrics in seeds.values()]
            n = min(len(r) for r in rows)
            mb = [statistics.fmean(r[i]["bytes_up_total"] for r in rows) / 1e6 for i in range(n)]
            acc = [statistics.fmean(100 * r[i]["accuracy"] for r in rows) for i in range(n)]
            ax.plot(mb, acc, color=colour, linestyle=style, label=f"{algorithm} {codec}")
        ax.set(
            xscale="log",
            xlabel="cumulative MB uploaded (all clients)",
            ylabel="personalized accuracy (%)",
            title=f"{dataset}, dir α = 0.1, 20 clients",
        )
        ax.grid(alpha=0.3)
        if done:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except FedrirError as e:  # bad settings or a damaged grid: one line, as fedrir says it
        sys.exit(f"{Path(__file__).name}: error: {e}")
