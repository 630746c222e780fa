"""fedrir: FedRIR (WWW 2025) personalized federated learning, baselines, and Flower deployment."""

from fedrir.api import RunResult, resume, run
from fedrir.config import Config, DataConfig, FedRIRConfig, TrainConfig, load_config
from fedrir.errors import FedrirError

__all__ = [
    "Config",
    "DataConfig",
    "FedRIRConfig",
    "FedrirError",
    "RunResult",
    "TrainConfig",
    "load_config",
    "resume",
    "run",
]
__version__ = "0.1.0"
