"""Choose FedRIR's default IDM loss (and see what the ablations cost) on a *validation* split.

Each client's training data is split 80/20 (``val_ratio = 0.2``) and every variant is evaluated
on the held-out 20 %; the clients' test sets are never touched. Each variant is one
``fedrir compare`` grid under ``--out``: finished runs are not redone, an interrupted grid
continues where it stopped, and a folder that holds a grid with other settings is refused.

    python benchmarks/choose_idm.py --fraction 0.25 --rounds 10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrir.compare import compare, parse_seeds
from fedrir.config import Config, with_overrides
from fedrir.errors import FedrirError
from fedrir.tables import format_mean_std

VARIANTS: dict[str, dict[str, object]] = {
    "idm=nll (reference code)": {"idm": "nll"},
    "idm=club (paper)": {"idm": "club"},
    "no IDM": {"idm": "none"},
    "no MCSL, no IDM": {"mcsl": False, "idm": "none"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--min-samples", type=int, default=200, help="smallest client (PFLlib's rule is 400 here)"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/choose_idm"))
    args = parser.parse_args()
    base = with_overrides(
        Config(),
        {
            "dataset": args.dataset,
            "fraction": args.fraction,
            "clients": args.clients,
            "alpha": args.alpha,
            "min_samples": args.min_samples,
            "rounds": args.rounds,
            "val_ratio": 0.2,
        },
    )
    seeds = parse_seeds(args.seeds)
    rows = []
    for name, overrides in VARIANTS.items():
        tag = name.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "-")
        cfg: Config = with_overrides(base, overrides)
        (row,) = compare(cfg, ["fedrir"], seeds, args.out / tag, progress=True)
        rows.append((name, row))
    print(
        f"\nvalidation accuracy (%), {args.dataset} fraction {args.fraction}, {args.clients} "
        f"clients (≥ {args.min_samples} samples), dir α={args.alpha}, {args.rounds} rounds, "
        f"seeds {args.seeds}; mean ± sample std over seeds"
    )
    print("| variant | final | best |\n|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {format_mean_std(r, 'final_accuracy')} "
            f"| {format_mean_std(r, 'best_accuracy')} |"
        )


if __name__ == "__main__":
    try:
        main()
    except FedrirError as e:  # bad settings or a damaged grid: one line, as fedrir says it
        sys.exit(f"{Path(__file__).name}: error: {e}")
