"""The comparison in ``benchmarks/RESULTS.md``: every algorithm on MNIST and Fashion-MNIST, 20
clients, Dirichlet α = 0.1 and ``pat`` (2 classes per client), several seeds.

Each setting is one ``fedrir compare`` grid under ``--out``; grids continue where they stopped, and
seeds are added one at a time across all four settings (each setting's ``results.md`` shows the
seeds measured so far). ``RESULTS.md`` is written once every grid holds every seed.
100 rounds, read off the clients' training accuracy (never the test data): at this scale (2-3
local steps per client and round) FedRIR's is still climbing at round 40 (93.3 % on MNIST dir,
seed 0, against 98.0 % at round 100), and from round 80 to 100 no method's moves by more than two
points; the global models of FedAvg and FedProx are the slowest. The records of finished
and diverged runs under ``benchmarks/compare/`` are committed (checkpoints are not, nor runs
with neither ``summary.json`` nor ``diverged.json``), so the grid continues on another machine
from where the last commit left it.

    python benchmarks/compare_grid.py                     # the committed table
    python benchmarks/compare_grid.py --seeds 0 --rounds 3 --fraction 0.02 --min-samples 20 \\
        --out /tmp/grid --results /tmp/grid/RESULTS.md     # a smoke run
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fedrir.algorithms import ALGORITHMS
from fedrir.compare import RESULTS_MD, compare, parse_seeds
from fedrir.config import Config, with_overrides
from fedrir.errors import FedrirError

OTHERS = "<!-- benchmarks/"
"""Where the sections of other benchmark scripts start in RESULTS.md (kept when it is rewritten)."""
SETTINGS = [(dataset, partition) for dataset in ("mnist", "fmnist") for partition in ("dir", "pat")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument(
        "--min-samples",
        type=int,
        default=50,
        help="smallest client for dir (PFLlib's rule, half the average, is rarely met at α = 0.1)",
    )
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/compare"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()
    seeds, algorithms = parse_seeds(args.seeds), args.algorithms.split(",")
    command = shlex.join(["python", "benchmarks/compare_grid.py", *sys.argv[1:]])
    base = with_overrides(
        Config(),
        {
            "rounds": args.rounds,
            "fraction": args.fraction,
            "clients": 20,
            "alpha": 0.1,
            "min_samples": args.min_samples,
            "eval_every": 1,
            "checkpoint_every": 10,  # FedRIR's client states are large; a run is minutes
        },
    )
    folders = [args.out / f"{dataset}-{partition}" for dataset, partition in SETTINGS]
    for done in range(1, len(seeds) + 1):
        for (dataset, partition), out in zip(SETTINGS, folders, strict=True):
            config: Config = with_overrides(base, {"dataset": dataset, "partition": partition})
            compare(config, algorithms, seeds[:done], out, progress=True)
    write_results(args.results, command, args, [(f / RESULTS_MD).read_text() for f in folders])


def write_results(path: Path, command: str, args: argparse.Namespace, tables: list[str]) -> None:
    n = round(70_000 * args.fraction)
    header = [
        "# FedRIR against the baselines, as measured",
        "",
        f"Produced by `{command}`.",
        "Every table below is one `fedrir compare` grid, its own command line at its top; each",
        "grid folder also holds `curves.png` (the mean accuracy curves).",
        "",
        f"Scale: a stratified {args.fraction:.0%} of each dataset ({n:,} of the 70 000 images",
        "of MNIST and of Fashion-MNIST) over 20 clients, 75 % of each client's share for",
        f"training; {args.rounds} rounds, every client in every round, one local epoch,",
        "batch 100, Adam 5e-4, the same CNN backbone for every method (FedRIR adds its",
        "client-side modules: see the parameter columns). Accuracies are on the clients'",
        "test sets, pooled; nothing was tuned on them. `dir` is Dirichlet α = 0.1, redrawn",
        f"until every client has at least {args.min_samples} samples; `pat` is two classes",
        "per client.",
        "",
    ]
    body = ["#" + t for t in tables]  # each grid's title one heading level down
    # sections other benchmarks write (between their markers, e.g. communication.py's) stay
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(OTHERS) :] if OTHERS in old else ""
    path.write_text("\n".join(header) + "\n" + "\n".join(body) + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    try:
        main()
    except FedrirError as e:  # bad settings or a damaged grid: one line, as fedrir says it
        sys.exit(f"{Path(__file__).name}: error: {e}")
