"""The ``fedrir`` command: parse, build the config, call the API, print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedrir.config import KEYS, Config, Key, load_config, with_overrides
from fedrir.errors import FedrirError

Handler = Callable[[argparse.Namespace], int]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, keys: Sequence[Key]) -> None:
    """One flag per config key, named like the key; booleans get a ``--no-…`` form too."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with settings (flags override it)"
    )
    for key in keys:
        default = key.field.default
        kwargs: dict[str, Any] = {"dest": key.name, "default": argparse.SUPPRESS}
        if key.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"[{key.dotted}] default: {'on' if default else 'off'}"
        else:
            kwargs["type"] = key.type
            kwargs["metavar"] = key.type.__name__.upper()
            kwargs["help"] = f"[{key.dotted}] default: {default!r}"
        parser.add_argument(_flag(key.name), **kwargs)


def build_config(args: argparse.Namespace) -> Config:
    """The config file (if any), then every flag given on the command line on top."""
    base = load_config(args.config) if getattr(args, "config", None) else Config()
    overrides = {name: getattr(args, name) for name in KEYS if hasattr(args, name)}
    return with_overrides(base, overrides)


def _data_keys() -> list[Key]:
    return [k for k in KEYS.values() if k.section == "data"] + [KEYS["seed"], KEYS["batch_size"]]


# --- commands ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from fedrir.api import RESULT_FILES, new_out_dir, resume, run
    from fedrir.results import format_summary

    if args.resume is not None:
        given = [_flag(n) for n in KEYS if hasattr(args, n) and n != "rounds"]
        given += ["--config"] * bool(args.config) + ["--out"] * bool(args.out)
        if given:
            raise FedrirError(
                "--resume continues a run with its saved config.toml; only --rounds may be "
                f"changed (got: {', '.join(given)})"
            )
        out, resumable = Path(args.resume), True
    else:
        config = build_config(args)
        out, resumable = new_out_dir(config, args.out or "auto"), config.engine != "flower"
    try:
        if args.resume is not None:
            result = resume(out, getattr(args, "rounds", None), progress=not args.quiet)
        else:
            result = run(config, out, progress=not args.quiet)
    except KeyboardInterrupt:
        fix = f"continue with: fedrir run --resume {out}" if resumable else f"delete {out}"
        print(f"fedrir: interrupted; {fix}", file=sys.stderr)
        return 130
    print(format_summary(result.summary))
    if result.out_dir is not None:
        print(f"results in {result.out_dir}/ ({', '.join(RESULT_FILES)})")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedrir.data.datasets import describe_datasets

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
    from fedrir.data.datasets import load_dataset
    from fedrir.data.federated import make_partition
    from fedrir.data.report import format_partition_table, partition_summary, plot_partition_heatmap

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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrir",
        description="FedRIR personalized federated learning, its baselines, and Flower.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="train one algorithm (default: FedRIR on MNIST, dir α=0.1)")
    _add_config_flags(p, list(KEYS.values()))
    p.add_argument("--out", metavar="DIR", help="result folder (default: a new one under runs/)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("datasets", help="list datasets and whether each is available here")
    _add_config_flags(p, _data_keys())
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_datasets)

    p = sub.add_parser("partition", help="show how a dataset is split across clients")
    _add_config_flags(p, _data_keys())
    p.add_argument("--json", action="store_true", help="print the per-client numbers as JSON")
    p.add_argument("--heatmap", metavar="PNG", help="also draw the labels × clients heatmap there")
    p.set_defaults(handler=cmd_partition)

    from fedrir.compare import add_compare_command

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
