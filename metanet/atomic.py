"""Write files so that a failure never leaves a half-written output behind.

The content is written to a temporary file (or folder) beside the destination and renamed
over it only once it is complete (rename is atomic on POSIX filesystems).
"""

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from metanet.errors import MetanetError


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to `destination`.

    On any exception the temporary file is removed and `destination` is left untouched;
    an OSError (disk full, permission denied) becomes a MetanetError naming the destination.
    """
    destination = Path(destination)
    tmp = None
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.replace(tmp, destination)
    except OSError as exc:
        raise MetanetError(f"cannot write {destination}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(destination: Path, what: str = "") -> Iterator[Path]:
    """Yield a new empty folder beside `destination` (one filesystem, so the final rename is atomic) to build an
    output in; once the body returns, the caller having written and verified it, it replaces `destination`.

    On any exception the folder is removed and `destination` is left as it was; an OSError becomes a
    MetanetError "cannot write {what}{destination}: …".
    """
    tmp = destination.parent / f".{destination.name}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir(parents=True)  # permissions from the umask, as for any folder the user creates
        yield tmp
        replace_folder(tmp, destination)
    except OSError as exc:
        raise MetanetError(f"cannot write {what}{destination}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, destination: Path) -> None:
    """Move `new` to `destination`, replacing an existing folder there only once `new` is complete."""
    if not destination.exists():
        os.replace(new, destination)
        return
    old = destination.with_name(f".{destination.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(destination, old)
    os.replace(new, destination)
    shutil.rmtree(old, ignore_errors=True)
