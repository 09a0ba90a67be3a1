"""Errors a user can act on.

Every failure caused by the user's input (a path, a checkpoint, an option) raises a
`MetanetError` whose message is one complete line naming the problem. The CLI prints
that line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class MetanetError(Exception):
    """Bad input: the message is one line that names the problem and, where it can, the fix."""


class CheckpointError(MetanetError):
    """A checkpoint that cannot be read: missing, malformed, unsupported or unsafe."""


class GraphError(MetanetError):
    """A parameter graph request that cannot be met (bad layer, too large to export)."""
