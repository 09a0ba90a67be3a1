"""Entry point of the `metanet` console script: the app with every command registered.

Heavy libraries (torch, torch_geometric, lightning, mlflow) are imported inside the
commands, so `metanet --help` answers at once.
"""

from cli import apply_commands, bench_commands, checkpoint_commands, convert_commands, heal_commands, model_commands, partition_commands, pipeline_commands, runs_commands, zoo_commands  # noqa: F401  (register the commands)
from cli.app import app

__all__ = ["app"]
