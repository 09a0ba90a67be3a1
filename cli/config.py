"""`--config FILE.yaml` for any command: the file's values become the command's defaults.

The option is eager, so its callback runs before the other options are resolved and
fills click's `default_map`; options given on the command line still win. Keys are the
command's option names (`max-edges` or `max_edges`); an unknown key is an error, so a
typo never silently does nothing.
"""

from pathlib import Path
from typing import Optional

import typer

from metanet.errors import MetanetError


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    if value is None:
        return value
    import yaml

    try:
        data = yaml.safe_load(value.read_text()) or {}
    except OSError as exc:
        raise MetanetError(f"--config {value}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise MetanetError(f"--config {value}: broken YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MetanetError(f"--config {value}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name != param.name}
    values = {str(key).replace("-", "_"): v for key, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise MetanetError(f"--config {value}: unknown option(s) {', '.join(unknown)} for `{ctx.info_name}`; known: {', '.join(sorted(known))}")
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def config_option() -> Optional[Path]:
    return typer.Option(
        None,
        "--config",
        help="YAML file of option values for this command; options on the command line override it.",
        is_eager=True,
        callback=_load_config,
        exists=True,
        dir_okay=False,
    )
