"""Command-line flags from configuration keys: one flag per key, named like it, and back.

Every command that takes settings (``run``, ``compare``, ``datasets``, ``partition``) builds its
flags and its :class:`~fedrir.config.Config` here, so a key added to the config is a flag
everywhere at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Sequence
from typing import Any

from fedrir.config import KEYS, Config, Key, load_config, with_overrides
from fedrir.errors import ConfigError


def flag(name: str) -> str:
    """The flag of the config key ``name`` (``join_ratio`` → ``--join-ratio``)."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, keys: Sequence[Key]) -> None:
    """``--config FILE`` and one flag per key; booleans get a ``--no-…`` form too. A flag not
    given leaves no attribute, so that :func:`build_config` knows what was typed."""
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
        parser.add_argument(flag(key.name), **kwargs)


def data_keys() -> list[Key]:
    """The keys that decide a federation's data: the ``data`` section, the seed, the batch."""
    return [k for k in KEYS.values() if k.section == "data"] + [KEYS["seed"], KEYS["batch_size"]]


def given(args: argparse.Namespace) -> list[str]:
    """The config keys set by flags on the command line."""
    return [name for name in KEYS if hasattr(args, name)]


def build_config(args: argparse.Namespace) -> Config:
    """The config file (if any), then every flag given on the command line on top."""
    path = getattr(args, "config", None)
    if path == "":
        raise ConfigError("--config is empty; name a TOML file (see configs/), or leave it out")
    base = Config() if path is None else load_config(path)
    return with_overrides(base, {name: getattr(args, name) for name in given(args)})


def as_flags(args: argparse.Namespace, skip: Collection[str] = ()) -> list[str]:
    """The settings typed (``--config`` and each key's flag), as command-line words again."""
    words = ["--config", args.config] if getattr(args, "config", None) else []
    for name in given(args):
        if name in skip:
            continue
        value = getattr(args, name)
        if isinstance(value, bool):
            words.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            words += [flag(name), str(value)]
    return words
