"""Partitions of FFN hidden neurons into experts, the methods that compute them, and routers."""

from metanet.partition.partition import LayerPartition, OperatingPoint, Partition

__all__ = ["LayerPartition", "OperatingPoint", "Partition"]
