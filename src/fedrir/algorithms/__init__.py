"""The algorithm registry: every algorithm is one module behind the contract in ``base``."""

from __future__ import annotations

from fedrir.algorithms.apfl import APFL
from fedrir.algorithms.base import Algorithm
from fedrir.algorithms.ditto import Ditto
from fedrir.algorithms.fedala import FedALA
from fedrir.algorithms.fedas import FedAS
from fedrir.algorithms.fedavg import FedAvg
from fedrir.algorithms.fedavg_ft import FedAvgFT
from fedrir.algorithms.fedbabu import FedBABU
from fedrir.algorithms.fedbn import FedBN
from fedrir.algorithms.fedcp import FedCP
from fedrir.algorithms.feddbe import FedDBE
from fedrir.algorithms.fedper import FedPer
from fedrir.algorithms.fedproto import FedProto
from fedrir.algorithms.fedprox import FedProx
from fedrir.algorithms.fedrep import FedRep
from fedrir.algorithms.fedrir import FedRIR
from fedrir.algorithms.fedrod import FedRoD
from fedrir.algorithms.gpfl import GPFL
from fedrir.algorithms.lgfedavg import LGFedAvg
from fedrir.algorithms.local import Local
from fedrir.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        FedRIR,
        Local,
        FedAvg,
        FedAvgFT,
        FedProx,
        FedPer,
        FedRep,
        FedBABU,
        LGFedAvg,
        Ditto,
        APFL,
        FedBN,
        FedRoD,
        FedALA,
        FedDBE,
        FedProto,
        FedCP,
        GPFL,
        FedAS,
    )
}


def get_algorithm(name: str) -> type[Algorithm]:
    """The algorithm class registered under ``name``."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm '{name}'; choose one of: {', '.join(ALGORITHMS)}"
        ) from None
