"""The ``fedrir`` command: parse, build the config, call the API, print."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrir import compare
from fedrir.api import resume, run
from fedrir.config import KEYS
from fedrir.data.datasets import describe_datasets, load_dataset
from fedrir.data.federated import make_partition
from fedrir.data.report import format_partition_table, partition_summary, plot_partition_heatmap
from fedrir.errors import FedrirError
from fedrir.flags import add_config_flags, as_flags, build_config, data_keys, flag, given
from fedrir.results import format_summary
from fedrir.runs import RESULT_FILES, new_out_dir

Handler = Callable[[argparse.Namespace], int]


# --- commands ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume is not None:
        typed = [flag(n) for n in given(args) if n != "rounds"]
        typed += ["--config"] * bool(args.config) + ["--out"] * bool(args.out)
        if typed:
            raise FedrirError(
                "--resume continues a run with its saved config.toml; only --rounds may be "
                f"changed (got: {', '.join(typed)})"
            )
        out = Path(args.resume)
    else:
        config = build_config(args)
        out = new_out_dir(config, args.out or "auto")
    try:
        if args.resume is not None:
            result = resume(out, getattr(args, "rounds", None), progress=not args.quiet)
        else:
            result = run(config, out, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"fedrir: interrupted; continue with: fedrir run --resume {out}", file=sys.stderr)
        return 130
    print(format_summary(result.summary))
    if result.out_dir is not None:
        print(f"results in {result.out_dir}/ ({', '.join(RESULT_FILES)})")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    rows = describe_datasets(build_config(args).data)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "available" if r["available"] else "not found"
        print(f"{r['name']:<{width}}  {mark:<9}  {r['description']}")
        if not r["available"]:
            print(f"{'':<{width}}  {'':<9}  how to get it: {r['how_to_get']}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    config = build_config(args)
    heatmap = Path(args.heatmap) if args.heatmap is not None else None
    if heatmap is not None and heatmap.suffix.lower() != ".png":
        raise FedrirError(f"--heatmap {heatmap} is not a .png path; name a .png file")
    dataset = load_dataset(config.data, config.seed)
    partition = make_partition(config.data, dataset, config.seed, config.train.batch_size)
    summary = partition_summary(dataset, partition)
    print(json.dumps(summary) if args.json else format_partition_table(summary))
    if heatmap is not None:
        try:
            plot_partition_heatmap(summary, heatmap)
        except OSError as e:
            raise FedrirError(
                f"cannot write {heatmap} ({e.strerror}); pick another --heatmap"
            ) from None
        if not args.json:
            print(f"heatmap written to {heatmap}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    config, seeds = build_config(args), compare.parse_seeds(args.seeds)
    codecs = None if args.codecs is None else compare.check_codecs(args.codecs.split(","))
    words = ["--algorithms", args.algorithms, "--seeds", args.seeds]
    words += [] if args.codecs is None else ["--codecs", args.codecs]
    command = "fedrir compare " + shlex.join([*words, *as_flags(args), "--out", args.out])
    try:
        compare.compare(
            config,
            args.algorithms.split(","),
            seeds,
            args.out,
            not args.quiet,
            command=command,
            codecs=codecs,
        )
    except KeyboardInterrupt:
        print(
            "fedrir: interrupted; rerun the same command to continue (finished runs are kept)",
            file=sys.stderr,
        )
        return 130
    out = Path(args.out)
    print((out / compare.RESULTS_MD).read_text(), end="")
    files = (compare.RESULTS_CSV, compare.RESULTS_MD, compare.CURVES, f"{compare.RUNS}/")
    print(f"\nresults in {out}/ ({', '.join(files)})")
    return 0


def add_compare_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedrir compare``."""
    p = subparsers.add_parser(
        "compare", help="run several algorithms × seeds on the same settings and tabulate them"
    )
    p.add_argument(
        "--algorithms", required=True, metavar="A,B,…", help="comma-separated algorithm names"
    )
    p.add_argument(
        "--codecs",
        metavar="C,C,…",
        help="comma-separated uplink codecs to compare, e.g. none,int8,topk:0.01+int8 "
        "(default: none)",
    )
    p.add_argument(
        "--seeds", default="0,1,2", metavar="S,S,…", help="comma-separated seeds (default: 0,1,2)"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="grid folder; rerunning into it continues the grid",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, [k for name, k in KEYS.items() if name not in compare.PER_RUN])
    p.set_defaults(handler=cmd_compare)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrir",
        description="FedRIR personalized federated learning, its baselines, and Flower.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train one algorithm (default: FedRIR on MNIST, dir α=0.1)")
    add_config_flags(p, list(KEYS.values()))
    p.add_argument("--out", metavar="DIR", help="result folder (default: a new one under runs/)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("datasets", help="list datasets and whether each is available here")
    add_config_flags(p, data_keys())
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_datasets)

    p = sub.add_parser("partition", help="show how a dataset is split across clients")
    add_config_flags(p, data_keys())
    p.add_argument("--json", action="store_true", help="print the per-client numbers as JSON")
    p.add_argument("--heatmap", metavar="PNG", help="also draw the labels × clients heatmap there")
    p.set_defaults(handler=cmd_partition)

    add_compare_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    args = parser.parse_args(argv or ["run"])
    handler: Handler = args.handler
    try:
        return handler(args)
    except FedrirError as e:
        print(f"fedrir: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedrir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
