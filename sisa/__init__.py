"""sisa: exact machine unlearning by SISA training (Sharded, Isolated, Sliced, Aggregated).

The estimator (and with it torch) is imported on first use, so `sisa --help` and the config tooling start fast.
"""

from .config import Config
from .exceptions import (
    ConfigError,
    DataError,
    IntegrityError,
    RunLockedError,
    RunStateError,
    SisaError,
    UnknownRecordError,
    UsageError,
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
    "UsageError",
    "run_status",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("SisaClassifier", "run_status"):
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module 'sisa' has no attribute {name!r}")
