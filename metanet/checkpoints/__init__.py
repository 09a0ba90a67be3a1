"""Reading dense checkpoints into canonical FFN layers (see DESIGN.md, "Canonical objects")."""

from metanet.checkpoints.checkpoint import BUNDLED, Checkpoint, open_checkpoint, resolve_path
from metanet.checkpoints.families import FAMILIES, SUPPORTED_MODEL_TYPES
from metanet.checkpoints.ffn_layer import ACTIVATIONS, FFNLayer, Norm

__all__ = [
    "ACTIVATIONS", "BUNDLED", "Checkpoint", "FAMILIES", "FFNLayer", "Norm",
    "SUPPORTED_MODEL_TYPES", "open_checkpoint", "resolve_path",
]
