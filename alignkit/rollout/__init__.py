"""Sampling backends for online methods. See `base.py` for the interface."""
from alignkit.rollout.base import RolloutBackend, RolloutBatch, SamplingParams

__all__ = ["RolloutBackend", "RolloutBatch", "SamplingParams"]
