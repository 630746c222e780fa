"""Run configuration: frozen dataclasses, built once at the edge, validated in ``__post_init__``.

A configuration is a top-level :class:`Config` (the run: algorithm, seed, rounds, engine, …) with
one section per concern (``data``, ``train``, ``fedrir``, ``baselines``). In TOML the run keys stand
at the top and each section is a table; on the command line every key is a flag of the same name
(``--join-ratio``, ``--mask-ratio``); boolean keys also have a ``--no-…`` form. Field names are
unique across sections so that a flag names exactly one key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedrir.engine.codecs import parse_codec
from fedrir.errors import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{key}': {message}")


def _finite_nonneg(value: float) -> bool:
    return value >= 0 and math.isfinite(value)


INT_MAX = 2**31 - 1
"""The largest any integer key may be: torch and numpy take many integer arguments as 32-bit, and
a larger value overflows inside them (a traceback, not a clear line)."""
INT_LIMITS: dict[str, tuple[int, str]] = {
    "threads": (1024, "more threads than any CPU here has; 0 uses every available CPU"),
    "batch_size": (2**20, "a batch that large does not fit in memory"),
    "embed_dim": (8192, "the layers of a wider feature do not fit in memory"),
    "patch_size": (1024, "a patch must fit in an image"),
    "state_cache_mb": (2**30, "that is more memory than exists, in MiB"),
}
"""Tighter upper bounds of some integer keys, with the reason."""


def _check_ints(section: object) -> None:
    """Every integer key of ``section`` within its upper bound (:data:`INT_LIMITS`, else
    :data:`INT_MAX`)."""
    for f in fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            limit, why = INT_LIMITS.get(f.name, (INT_MAX, "larger integers overflow inside torch"))
            _check(value <= limit, f.name, f"{value} is too large: at most {limit} ({why})")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


FOLDER_PREPROCESSING = ("resize", "authors")


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is split across clients, and where it lives."""

    dataset: str = "mnist"
    """Dataset name (``fedrir datasets`` lists them)."""
    partition: str = "dir"
    """``iid``, ``pat`` (classes per client), ``dir`` (Dirichlet α), ``exdir`` or ``natural``."""
    clients: int = 20
    alpha: float = 0.1
    """Dirichlet concentration for ``dir`` and ``exdir``; smaller is more skewed."""
    classes_per_client: int = 0
    """Classes per client for ``pat`` and ``exdir``; 0 picks 2 for 10 classes, 10 for 100."""
    min_samples: int = 0
    """Smallest client ``dir`` accepts (it redraws until every client has this many samples);
    0 is PFLlib's rule, min(batch_size / (1 − train_ratio), samples / clients / 2)."""
    train_ratio: float = 0.75
    """Share of each client's samples in its local training set (the rest is its test set)."""
    val_ratio: float = 0.0
    """When > 0, carve this share of each client's training set as a validation set and evaluate on
    it instead of the test set: for choosing hyper-parameters without touching test data."""
    fraction: float = 1.0
    """Stratified, seeded subset of the pooled dataset, for quick runs."""
    data_dir: str = ""
    """Root folder of local dataset copies; empty means each dataset's default location."""
    cache_dir: str = ""
    """Where partitions are cached; empty means ``~/.cache/fedrir``."""
    download: bool = False
    """Download a dataset that is not found locally (from its official location, checksummed)."""
    allow_pickle: bool = False
    """Allow formats that need unpickling (CIFAR python format, PFLlib npz): trusted files only."""
    folder_preprocessing: str = "resize"
    """Office-Caltech-10 and DomainNet images: ``resize`` (bilinear to 64×64, pixels normalised to
    [−1, 1], as PFLlib) or ``authors`` (the FedRIR code's: one random-resized crop, scale
    0.75–1, to 64×64 and a random horizontal flip per image when the data is made, pixels in
    [0, 1])."""

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(self.clients >= 1, "clients", "need at least 1 client")
        _check(self.alpha > 0 and math.isfinite(self.alpha), "alpha", "must be a positive number")
        _check(self.classes_per_client >= 0, "classes_per_client", "must be >= 0 (0 = automatic)")
        _check(self.min_samples >= 0, "min_samples", "must be >= 0 (0 = PFLlib's rule)")
        _check(0 < self.train_ratio < 1, "train_ratio", "must be strictly between 0 and 1")
        _check(0 <= self.val_ratio < 1, "val_ratio", "must be in [0, 1)")
        _check(0 < self.fraction <= 1, "fraction", "must be in (0, 1]")
        _one_of(self.folder_preprocessing, "folder_preprocessing", FOLDER_PREPROCESSING)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings shared by every algorithm."""

    lr: float = 5e-4
    batch_size: int = 100
    local_epochs: int = 1
    optimizer: str = "adam"
    """``adam`` or ``sgd`` (plain SGD, momentum 0)."""
    embed_dim: int = 512
    """Width of the feature the shared backbone outputs (FedRIR's d)."""

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.local_epochs >= 1, "local_epochs", "must be >= 1")
        _one_of(self.optimizer, "optimizer", ("adam", "sgd"))
        _check(self.embed_dim >= 1, "embed_dim", "must be >= 1")


IDM_VARIANTS = ("nll", "club", "none")


@dataclass(frozen=True)
class FedRIRConfig:
    """FedRIR's own settings (the authors' reference values as defaults)."""

    mask_ratio: float = 0.6
    """Share of patches zeroed in each image for masked client-specific learning."""
    patch_size: int = 4
    kl_weight: float = 0.1
    idm: str = "nll"
    """``nll``: the reference code's loss; ``club``: the paper's CLUB bound; ``none``: no IDM."""
    idm_weight: float = 1.0
    """λ, the weight of the IDM loss in stage 2."""
    mcsl: bool = True
    """Masked client-specific learning; off removes the client-specific branch (an ablation)."""
    common_init: bool = True
    """Broadcast one initial GFE; off gives every client its own random init, as the reference."""

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(0 <= self.mask_ratio < 1, "mask_ratio", "must be in [0, 1)")
        _check(self.patch_size >= 1, "patch_size", "must be >= 1")
        _check(_finite_nonneg(self.kl_weight), "kl_weight", "must be a number >= 0")
        _one_of(self.idm, "idm", IDM_VARIANTS)
        _check(_finite_nonneg(self.idm_weight), "idm_weight", "must be a number >= 0")
        _check(
            self.mcsl or self.idm == "none",
            "idm",
            "without MCSL there is no client-specific feature to distil against; "
            "pass --idm none together with --no-mcsl",
        )


@dataclass(frozen=True)
class BaselineConfig:
    """Hyper-parameters of the baselines (each paper's or its standard implementation's values)."""

    prox_mu: float = 0.01
    """FedProx proximal weight μ."""
    ft_epochs: int = 10
    """Local fine-tuning epochs before evaluation (``fedavg-ft``, ``fedbabu``); PFLlib's FedBABU
    default (``--fine_tuning_epochs 10``)."""
    head_epochs: int = 10
    """FedRep: local epochs on the personal head before the body's epoch."""
    ditto_lambda: float = 0.1
    """Ditto: pull of the personal model towards the global one."""
    apfl_alpha: float = 0.5
    """APFL: initial mixing weight of the personal model (then learned)."""
    ala_eta: float = 1.0
    """FedALA: learning rate of the element-wise aggregation weights (PFLlib ``--eta``)."""
    ala_rand_percent: int = 80
    """FedALA: share (%) of the local training data the weights are learned on (PFLlib
    ``--rand_percent``)."""
    ala_layer_idx: int = 2
    """FedALA: how many of the model's last parameter tensors are aggregated adaptively (0: all;
    2: the head's weight and bias; PFLlib ``--layer_idx``)."""
    dbe_momentum: float = 1.0
    """FedDBE: momentum of the running mean of local representations (1: the batch mean; the
    authors' run script, ``-mo 1``)."""
    dbe_kappa: float = 50.0
    """FedDBE: weight κ of the mean regularizer (the authors' run script, ``-klw 50``)."""
    proto_lambda: float = 1.0
    """FedProto: weight λ of the distance to the global prototypes (PFLlib ``--lamda``)."""
    cp_lambda: float = 5.0
    """FedCP: weight of the MMD between the features of the trained and the received extractor
    (the authors' value for the 4-layer CNN, TsingZ0/FedCP ``run_me.sh``)."""
    gpfl_lambda: float = 0.01
    """GPFL: weight of the magnitude regularizer ‖f_G − e_y‖ (TsingZ0/GPFL ``run_me.sh``, CNN)."""
    gpfl_mu: float = 0.1
    """GPFL: L2 weight on the GCE and CoV parameters (TsingZ0/GPFL ``run_me.sh``, CNN)."""
    as_align_lr: float = 0.01
    """FedAS: SGD learning rate of the parameter alignment (PFLlib ``clientas.py``)."""
    as_align_epochs: int = 1
    """FedAS: epochs of parameter alignment per round; 0 turns the alignment off."""
    as_align_batch_size: int = 16
    """FedAS: batch size of the parameter alignment (PFLlib ``clientas.py``)."""

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(_finite_nonneg(self.prox_mu), "prox_mu", "must be a number >= 0")
        _check(self.ft_epochs >= 0, "ft_epochs", "must be >= 0")
        _check(self.head_epochs >= 1, "head_epochs", "must be >= 1")
        _check(_finite_nonneg(self.ditto_lambda), "ditto_lambda", "must be a number >= 0")
        _check(0 <= self.apfl_alpha <= 1, "apfl_alpha", "must be in [0, 1]")
        _check(_finite_nonneg(self.ala_eta), "ala_eta", "must be a number >= 0")
        _check(1 <= self.ala_rand_percent <= 100, "ala_rand_percent", "must be in 1…100")
        _check(self.ala_layer_idx >= 0, "ala_layer_idx", "must be >= 0 (0 = every layer)")
        _check(0 < self.dbe_momentum <= 1, "dbe_momentum", "must be in (0, 1]")
        _check(_finite_nonneg(self.dbe_kappa), "dbe_kappa", "must be a number >= 0")
        _check(_finite_nonneg(self.proto_lambda), "proto_lambda", "must be a number >= 0")
        _check(_finite_nonneg(self.cp_lambda), "cp_lambda", "must be a number >= 0")
        _check(_finite_nonneg(self.gpfl_lambda), "gpfl_lambda", "must be a number >= 0")
        _check(_finite_nonneg(self.gpfl_mu), "gpfl_mu", "must be a number >= 0")
        _check(
            self.as_align_lr > 0 and math.isfinite(self.as_align_lr),
            "as_align_lr",
            "must be a positive number",
        )
        _check(self.as_align_epochs >= 0, "as_align_epochs", "must be >= 0 (0: no alignment)")
        _check(self.as_align_batch_size >= 1, "as_align_batch_size", "must be >= 1")


ENGINES = ("sim", "flower")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Config:
    """A whole run. Saved next to every result as ``config.toml``."""

    algorithm: str = "fedrir"
    seed: int = 0
    rounds: int = 20
    join_ratio: float = 1.0
    """Share of clients selected each round (int(N · join_ratio), at least 1)."""
    random_join: bool = False
    """Draw each round's client count at random between int(N · join_ratio) and N."""
    dropout: float = 0.0
    """Probability that a selected client fails mid-round and contributes nothing."""
    eval_every: int = 1
    """Evaluate every this many rounds; the last round is always evaluated."""
    eval_clients: int = 0
    """On intermediate evaluation rounds, evaluate a seeded sample of this many clients (0: every
    client); the last round always evaluates every client, so the final accuracy covers all."""
    engine: str = "sim"
    """``sim`` (in-process simulator) or ``flower`` (Flower's simulation engine)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "auto"
    """``fp32``, ``bf16`` (autocast), or ``auto``: bf16 on CUDA and on CPUs with native BF16."""
    channels_last: bool = True
    """Run convolutions in channels-last memory format (faster on CPU)."""
    threads: int = 0
    """Torch intra-op threads where client code runs, on either engine; 0: every available CPU."""
    checkpoint_every: int = 1
    """Write a resumable checkpoint every this many rounds (0: never)."""
    state_cache_mb: int = 1024
    """Memory (MiB) for clients' private states; the rest wait on disk, in the run's checkpoint
    folder (the store is the checkpoint)."""
    uplink: str = "none"
    """Codec of what clients send (their update: the upload minus what they received): ``none``,
    ``fp16``, ``bf16``, ``int8``, ``qsgd:B``, ``topk:R`` or ``topk:R+C`` (see
    :mod:`fedrir.engine.codecs` and :mod:`fedrir.engine.transport`)."""
    downlink: str = "none"
    """Codec of what the server broadcasts: ``none``, ``fp16``, ``bf16``, ``int8`` or ``qsgd:B``
    (not top-k: a broadcast is the whole model, not an update)."""
    new_clients: int = 0
    """Clients held out of training (a seeded set of ``clients``): never selected nor aggregated,
    they only receive the broadcast on new-client rounds, adapt and are scored (0: none)."""
    new_client_every: int = 0
    """Evaluate the new clients (and the global model) every this many rounds, on evaluation
    rounds; the last round always (0: the last round only)."""
    new_client_epochs: int = 1
    """Epochs a new client trains its private parts on its training split, shared parts frozen."""
    new_client_full: bool = False
    """Also score new clients after training everything (shared parts too) for as many epochs."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fedrir: FedRIRConfig = field(default_factory=FedRIRConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        _check_ints(self)
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        _check(0 < self.join_ratio <= 1, "join_ratio", "must be in (0, 1]")
        _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        _check(self.eval_every >= 1, "eval_every", "must be >= 1")
        _check(self.eval_clients >= 0, "eval_clients", "must be >= 0 (0 = every client)")
        _one_of(self.engine, "engine", ENGINES)
        _one_of(self.precision, "precision", PRECISIONS)
        _check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            f"{self.device!r} is not auto, cpu, cuda or cuda:N",
        )
        _check(self.threads >= 0, "threads", "must be >= 0")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _check(self.state_cache_mb >= 0, "state_cache_mb", "must be >= 0 (MiB)")
        _check(self.seed >= 0, "seed", "must be >= 0")
        _check(
            0 <= self.new_clients < self.data.clients,
            "new_clients",
            f"{self.new_clients} must be >= 0 and leave at least one of the {self.data.clients} "
            "clients to train; lower --new-clients or raise --clients",
        )
        _check(self.new_client_every >= 0, "new_client_every", "must be >= 0 (0: last round only)")
        _check(self.new_client_epochs >= 0, "new_client_epochs", "must be >= 0")
        for key in ("uplink", "downlink"):
            try:
                parse_codec(getattr(self, key))
            except ConfigError as e:
                raise ConfigError(f"invalid value for '{key}': {e}") from None
        _check(
            not parse_codec(self.downlink).has_state,
            "downlink",
            f"{self.downlink!r}: top-k cannot carry a broadcast (it is the whole model, not an "
            "update); use none, fp16, bf16, int8 or qsgd:B on the downlink",
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "fedrir": FedRIRConfig,
    "baselines": BaselineConfig,
}


@dataclass(frozen=True)
class Key:
    """One configuration key: its section ('' for the run level) and its dataclass field."""

    section: str
    field: dataclasses.Field[Any]

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    @property
    def type(self) -> type:
        return type(self.field.default)


def _keys() -> dict[str, Key]:
    keys: dict[str, Key] = {}
    sections = [("", Config), *SECTIONS.items()]
    for section, cls in sections:
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            assert f.name not in keys, f"config key {f.name!r} is defined twice"
            keys[f.name] = Key(section, f)
    return keys


KEYS: dict[str, Key] = _keys()
"""Every configuration key by its (unique) name."""

ALGORITHM_KEYS = frozenset(k for k, key in KEYS.items() if key.section in ("fedrir", "baselines"))
"""The keys of single algorithms' own settings; each algorithm names those it reads
(``Algorithm.settings``) and no other can change its runs."""


def _coerce(key: Key, value: Any) -> Any:
    want = key.type
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(
            f"invalid value for '{key.dotted}': expected {want.__name__}, got {value!r}"
        )
    return value


def flat_value(config: Config, name: str) -> Any:
    """The value of the key ``name`` (a flat name, as in :data:`KEYS`) in ``config``."""
    section = KEYS[name].section
    return getattr(getattr(config, section) if section else config, name)


def with_overrides(config: Config, overrides: Mapping[str, Any]) -> Config:
    """Return ``config`` with the given keys (flat names, as in :data:`KEYS`) replaced."""
    run: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for name, value in overrides.items():
        key = KEYS.get(name)
        if key is None:
            raise ConfigError(f"unknown config key '{name}'; known keys: {', '.join(KEYS)}")
        (sections[key.section] if key.section else run)[name] = _coerce(key, value)
    for section, values in sections.items():
        if values:
            run[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **run)


def config_from_dict(data: Mapping[str, Any], source: str = "config") -> Config:
    """Build a config from the nested mapping a TOML file holds; unknown keys are errors."""
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: '{name}' must be a table ([{name}])")
            for sub, subvalue in value.items():
                key = KEYS.get(sub)
                if key is None or key.section != name:
                    known = ", ".join(k for k, v in KEYS.items() if v.section == name)
                    raise ConfigError(f"{source}: unknown key '{name}.{sub}'; known: {known}")
                flat[sub] = subvalue
        else:
            key = KEYS.get(name)
            if key is None or key.section:
                hint = f" (it belongs in [{key.section}])" if key else ""
                raise ConfigError(f"{source}: unknown top-level key '{name}'{hint}")
            flat[name] = value
    return with_overrides(Config(), flat)


def load_config(path: str | Path) -> Config:
    """Read a TOML configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text; a config file is TOML, see configs/") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML: {e}") from None
    return config_from_dict(data, source=str(p))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON escapes quotes, backslashes and control characters as a TOML basic string does
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)


def config_to_toml(config: Config) -> str:
    """Serialise a config to TOML that :func:`load_config` reads back to an equal config."""
    lines = [
        f"{f.name} = {toml_value(getattr(config, f.name))}"
        for f in fields(Config)
        if f.name not in SECTIONS
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        sub = getattr(config, section)
        lines += [f"{f.name} = {toml_value(getattr(sub, f.name))}" for f in fields(sub)]
    return "\n".join(lines) + "\n"


def run_identity(config: Config) -> str:
    """A digest of every setting but ``rounds``: what a resumed run must share with its start."""
    return hashlib.sha256(
        config_to_toml(dataclasses.replace(config, rounds=1)).encode()
    ).hexdigest()
