"""metanet: FFN layers → parameter graphs → predicted Mixture-of-Experts partitions.

The package root stays import-light (no torch) so the CLI answers `--help` at once;
import the sub-packages (`metanet.checkpoints`, `metanet.graphs`, …) for the work.
"""

__version__ = "0.1.0"
