"""The equivariant graph metanetwork that predicts expert assignments and routers (DESIGN.md)."""

from metanet.model.network import MetaNetConfig, MetaNetwork

__all__ = ["MetaNetConfig", "MetaNetwork"]
