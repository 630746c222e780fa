"""The ``fedrir`` command: parse, build the config, call the API, print."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from fedrir import compare
from fedrir.api import resume, run
from fedrir.config import KEYS
from fedrir.data.datasets import describe_datasets, load_dataset
from fedrir.data.federated import make_partition
from fedrir.data.report import format_partition_table, partition_summary, plot_partition_heatmap
from fedrir.errors import FedrirError
from fedrir.flags import add_config_flags, as_flags, build_config, data_keys, flag, given
from fedrir.results import format_summary, strict_json
from fedrir.runs import RESULT_FILES, new_out_dir

Handler = Callable[[argparse.Namespace], int]


# --- commands ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume == "":
        raise FedrirError("--resume is empty; name the folder of the run to continue")
    if args.resume is not None:
        typed = [flag(n) for n in given(args) if n != "rounds"]
        typed += ["--config"] * (args.config is not None) + ["--out"] * (args.out is not None)
        if typed:
            raise FedrirError(
                "--resume continues a run with its saved config.toml; only --rounds may be "
                f"changed (got: {', '.join(typed)})"
            )
        out = Path(args.resume)
    else:
        config = build_config(args)
        out = new_out_dir(config, "auto" if args.out is None else args.out)
    try:
        if args.resume is not None:
            rounds = getattr(args, "rounds", None)
            result = resume(out, rounds, progress=not args.quiet, quiet=args.quiet)
        else:
            result = run(config, out, progress=not args.quiet, quiet=args.quiet)
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
        print(strict_json(rows, indent=2))
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
    print(strict_json(summary) if args.json else format_partition_table(summary))
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


def cmd_clientapp(args: argparse.Namespace) -> int:
    from fedrir.flower.worker import serve_clientapps  # Flower and torch: only for this command

    certificates = None
    if args.root_certificates is not None:
        try:
            certificates = Path(args.root_certificates).read_bytes()
        except OSError as e:
            raise FedrirError(
                f"cannot read --root-certificates {args.root_certificates} ({e.strerror})"
            ) from None
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # SIGINT here once the SuperNode is gone
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, or the SuperNode gone: done
        serve_clientapps(args.runtime_api_address, certificates)
    return 0


def add_compare_command(subparsers: argparse._SubParsersAction[Any]) -> None:
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


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the problem, and where the flags are listed) rather
    than a page of usage first; sub-commands are built with the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    p.add_argument(
        "--quiet", action="store_true", help="no progress bar; on Flower, its warnings only"
    )
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

    p = sub.add_parser(
        "clientapp",
        help="serve a SuperNode's ClientApp messages from this one long-lived process",
        description="Run beside a SuperNode started with --isolation process: claims the "
        "node's ClientApp tasks one after another and runs fedrir's ClientApp in this process "
        "(no new process, no new torch import per message). See docs/deployment.md.",
    )
    p.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API: its --host and --port (default: 127.0.0.1:9094)",
    )
    p.add_argument(
        "--root-certificates",
        metavar="PEM",
        help="CA of a Runtime API served with TLS (default: plain HTTP, for the node's loopback)",
    )
    p.add_argument(
        "--parent-pid", type=int, metavar="PID", help="exit when this process (the SuperNode) ends"
    )
    p.set_defaults(handler=cmd_clientapp)
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
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "allocate memory" not in str(e):
            raise
        print(
            "fedrir: error: not enough memory for this run; lower --embed-dim, --batch-size, "
            "--clients or --state-cache-mb",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("fedrir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
