"""sisa: exact machine unlearning by SISA training (Sharded, Isolated, Sliced, Aggregated)."""

from .config import Config
from .estimator import SisaClassifier, run_status
from .exceptions import (
    ConfigError,
    DataError,
    IntegrityError,
    RunLockedError,
    RunStateError,
    SisaError,
    UnknownRecordError,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "RunLockedError",
    "RunStateError",
    "SisaClassifier",
    "SisaError",
    "UnknownRecordError",
    "run_status",
]
__version__ = "0.1.0"
