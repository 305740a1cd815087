"""Stacked training: the shards of a group trained as one batched model (placeholder until the stacked executor lands)."""

from __future__ import annotations

import logging

from .config import Config
from .training import ShardData, ShardJob, ShardResult, TrainSpec, train_shard

log = logging.getLogger("sisa")


def choose_executor(config: Config) -> str:
    """Resolve ``training.executor: auto``."""
    return "loop" if config.training.executor == "auto" else config.training.executor


def train_stacked(spec: TrainSpec, jobs: list[ShardJob], data: dict[int, ShardData]) -> list[ShardResult]:
    log.info("stacked executor not available yet; training shard by shard")
    return [train_shard(spec, job, data[job.shard]) for job in jobs]
