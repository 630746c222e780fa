"""Does the IDM buy generalization? FedRIR's variants and reference methods scored on clients held
out of training (new clients) and with their global model, beside personalized accuracy.

The scale of ``benchmarks/RESULTS.md`` (a stratified 10 % of MNIST and of Fashion-MNIST, Dirichlet
α = 0.1, at least 50 samples per client, 100 rounds, every training client every round), with 25
clients of which 5 are held out as new clients (``new_clients = 5``): 20 train. On the last round
each new client receives the broadcast, trains its private parts for ``new_client_epochs`` epochs
with the shared parts frozen (a probe of the shared representation) and is scored on its test
split: *adapted*; *full* trains everything as long; *zero-shot* is the global model alone, where
a method has one, which is also scored on every client's test data (*global*).

Each run is an ordinary run folder, ``--out/<dataset>/<variant>-seed<seed>/``: a finished run
(``summary.json``) is skipped, an unfinished one resumed from its checkpoint, so the script
continues where it stopped. Runs go seed by seed, MNIST before Fashion-MNIST. After every run the
section between the markers below in ``--results`` is rewritten from the finished runs.

    python benchmarks/generalization.py                             # the committed section
    python benchmarks/generalization.py --seeds 0 --rounds 2 --fraction 0.02 \\
        --out /tmp/gen --results /tmp/gen/RESULTS.md                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import fedrir
from fedrir import tables
from fedrir.compare import parse_seeds
from fedrir.config import Config, with_overrides
from fedrir.errors import FedrirError
from fedrir.runs import CONFIG_FILE, SUMMARY_FILE

VARIANTS: dict[str, dict[str, Any]] = {
    "fedrir-nll": {"algorithm": "fedrir", "idm": "nll"},
    "fedrir-club": {"algorithm": "fedrir", "idm": "club"},
    "fedrir-none": {"algorithm": "fedrir", "idm": "none"},
    "fedrir-nomcsl": {"algorithm": "fedrir", "mcsl": False, "idm": "none"},
    "fedavg": {"algorithm": "fedavg"},
    "fedper": {"algorithm": "fedper"},
    "fedrod": {"algorithm": "fedrod"},
    "fedbabu": {"algorithm": "fedbabu"},
    "ditto": {"algorithm": "ditto"},
}
"""Variant name → its settings over the common ones, in the order they run: FedRIR with the
reference code's IDM loss, the paper's CLUB bound, no IDM, and neither IDM nor MCSL."""
DATASETS = ("mnist", "fmnist")
COLUMNS = (
    ("final_accuracy", "personalized"),
    ("new_client_zero_shot_accuracy", "new: zero-shot"),
    ("new_client_accuracy", "new: adapted"),
    ("new_client_full_accuracy", "new: all trained"),
    ("global_accuracy", "global"),
)
"""Summary key → column title; accuracies in %, mean ± sample std over the finished seeds."""
START, END = "<!-- generalization: start -->", "<!-- generalization: end -->"


def run_one(config: Config, out: Path) -> None:
    """Run ``config`` into ``out``; skip it when finished, resume it when started."""
    if (out / SUMMARY_FILE).exists():
        return
    if (out / CONFIG_FILE).exists():
        fedrir.resume(out)
    else:
        fedrir.run(config, out=out)


def cell(summaries: list[dict[str, Any]], key: str) -> str:
    """``key`` over the runs, as ``fedrir compare``'s tables write it (empty: no run yet)."""
    if not summaries:
        return ""
    mean, std = tables.optional_mean_std(summaries, key)
    return tables.format_mean_std({f"{key}_mean": mean, f"{key}_std": std}, key)


def section(out: Path, seeds: list[int], command: str, config: Config) -> str:
    lines = [
        START,
        "## Generalization: new clients and the global model",
        "",
        f"Produced by `{command}` (runs in `{out}/<dataset>/<variant>-seed<seed>/`).",
        "",
        f"{config.data.clients} clients (Dirichlet α = {config.data.alpha}, at least "
        f"{config.data.min_samples} samples each, a stratified {config.data.fraction:.0%} of the "
        f"dataset), {config.new_clients} of them held out of training as new clients; "
        f"{config.rounds} rounds, every training client every round. *personalized*: the "
        "training clients' own test data, as in the tables above. On the last round each new "
        "client gets the broadcast and trains its private parts for "
        f"{config.new_client_epochs} epochs with the shared parts frozen (*new: adapted*, a "
        "probe of the shared representation; for FedRIR: CSFE and generator, then IDM and "
        "head), or everything as long (*new: all trained*); *zero-shot* is the global model "
        "alone on the new clients, *global* the global model on every client's test data; n/a "
        "where a method has no global model. Accuracies in %, mean ± sample std over the "
        "seeds finished (the *seeds* column); an empty row has no finished run yet.",
    ]
    for dataset in DATASETS:
        lines += [
            "",
            f"### {dataset}",
            "",
            "| variant | " + " | ".join(title for _, title in COLUMNS) + " | seeds |",
            "|---|" + "---:|" * (len(COLUMNS) + 1),
        ]
        for variant in VARIANTS:
            summaries = []
            for seed in seeds:
                path = out / dataset / f"{variant}-seed{seed}" / SUMMARY_FILE
                if path.exists():
                    summaries.append(json.loads(path.read_text()))
            cells = [cell(summaries, key) for key, _ in COLUMNS]
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {len(summaries)} |")
    return "\n".join([*lines, END]) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the section between the markers in ``path`` (appended the first time)."""
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        before, _, rest = old.partition(START)
        _, _, after = rest.partition(END)
        new = before + text.rstrip("\n") + after
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--min-samples", type=int, default=50)
    parser.add_argument("--new-client-epochs", type=int, default=10)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names as in VARIANTS")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/generalization"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise FedrirError(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
    command = shlex.join(["python", "benchmarks/generalization.py", *sys.argv[1:]])
    base = with_overrides(
        Config(),
        {
            "rounds": args.rounds,
            "fraction": args.fraction,
            "clients": 25,
            "new_clients": 5,
            "new_client_epochs": args.new_client_epochs,
            "new_client_full": True,
            "alpha": 0.1,
            "min_samples": args.min_samples,
            "eval_every": 10,  # the last round is always evaluated; the rest is a curve
            "checkpoint_every": 10,
        },
    )
    for seed in seeds:
        for dataset in args.datasets.split(","):
            for variant in variants:
                overrides = VARIANTS[variant] | {"dataset": dataset, "seed": seed}
                out = args.out / dataset / f"{variant}-seed{seed}"
                run_one(with_overrides(base, overrides), out)
                write_section(args.results, section(args.out, seeds, command, base))
                print(f"finished {dataset} {variant} seed {seed}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except FedrirError as e:  # bad settings or a damaged run: one line, as fedrir says it
        sys.exit(f"{Path(__file__).name}: error: {e}")
