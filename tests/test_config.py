"""Configuration: TOML round trip; unknown keys and bad values stop with a message naming it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedrir.cli import make_parser
from fedrir.config import (
    KEYS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_toml,
    load_config,
    with_overrides,
)
from fedrir.flags import build_config


def test_toml_round_trip(tmp_path: Path) -> None:
    config = with_overrides(
        Config(),
        {
            "rounds": 7,
            "alpha": 0.5,
            "idm": "club",
            "common_init": False,
            "data_dir": 'a"b\\c\nd\té\x7f',
        },
    )
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(config), encoding="utf-8")
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"rounds": 0}, "invalid value for 'rounds'"),
        ({"data": {"alpha": -1.0}}, "invalid value for 'alpha'"),
        ({"data": {"alpah": 0.1}}, "unknown key 'data.alpah'"),
        ({"alpha": 0.1}, r"belongs in \[data\]"),
        ({"rounds": "ten"}, "expected int"),
        ({"fedrir": {"idm": "mine"}}, "'mine' is not one of nll, club, none"),
        ({"train": {"optimizer": "adamw"}}, "'adamw' is not one of adam, sgd"),
        ({"precision": "fp16"}, "not one of auto, fp32, bf16"),
        ({"data": 3}, "must be a table"),
    ],
)
def test_bad_config_names_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe rounds = 3")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(bad)


def test_flags_carry_the_key_names_and_booleans_switch_off(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("rounds = 5\n[fedrir]\nmask_ratio = 0.5\n")
    args = make_parser().parse_args(
        ["run", "--config", str(path), "--join-ratio", "0.5", "--no-common-init", "--rounds", "9"]
    )
    config = build_config(args)
    assert config.rounds == 9  # flag beats file
    assert config.fedrir.mask_ratio == 0.5  # file beats default
    assert config.join_ratio == 0.5 and config.fedrir.common_init is False
    assert config.data == Config().data


def test_every_key_is_a_flag() -> None:
    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    run = commands.choices["run"]
    flags = {flag for action in run._actions for flag in action.option_strings}
    for name in KEYS:
        assert "--" + name.replace("_", "-") in flags, name
