"""Choose FedRIR's default IDM loss (and see what the ablations cost) on a *validation* split.

Each client's training data is split 80/20 (``val_ratio = 0.2``) and every variant is evaluated
on the held-out 20 %; the clients' test sets are never touched. Finished runs are kept under
``--out`` and not redone, so an interrupted grid continues where it stopped.

    python benchmarks/choose_idm.py --fraction 0.25 --rounds 10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import fedrir
from fedrir.config import Config, with_overrides

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
    rows = []
    for name, overrides in VARIANTS.items():
        finals, bests = [], []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg: Config = with_overrides(base, {**overrides, "seed": seed})
            tag = name.split(" (")[0].replace(" ", "_").replace(",", "").replace("=", "-")
            out = args.out / f"{tag}-seed{seed}"
            if (out / "summary.json").exists():
                summary = json.loads((out / "summary.json").read_text())
            elif (out / "config.toml").exists():
                summary = fedrir.resume(out, progress=True).summary
            else:
                summary = fedrir.run(cfg, out=out, progress=True).summary
            finals.append(100 * summary["final_accuracy"])
            bests.append(100 * summary["best_accuracy"])
        rows.append((name, finals, bests))
    print(
        f"\nvalidation accuracy (%), {args.dataset} fraction {args.fraction}, {args.clients} "
        f"clients (≥ {args.min_samples} samples), dir α={args.alpha}, {args.rounds} rounds, "
        f"seeds {args.seeds}"
    )
    print("| variant | final (mean ± std) | best (mean ± std) |\n|---|---|---|")
    for name, finals, bests in rows:
        sd = statistics.stdev  # sample std over seeds, as fedrir compare reports
        print(
            f"| {name} | {statistics.mean(finals):.2f} ± {sd(finals):.2f} "
            f"| {statistics.mean(bests):.2f} ± {sd(bests):.2f} |"
        )


if __name__ == "__main__":
    main()
