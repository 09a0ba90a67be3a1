"""Healing: distil a converted MoE model back toward its dense teacher (routers, or routers and experts)."""

from metanet.heal.heal import heal
from metanet.heal.settings import PRECISIONS, TRAIN_MODES, HealSettings

__all__ = ["PRECISIONS", "TRAIN_MODES", "HealSettings", "heal"]
