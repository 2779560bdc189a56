"""Writing a directory all at once: build it under a temporary sibling name, swap it into place.

A crash or an error mid-write then leaves no half-written output where a complete one is expected,
and an existing output is replaced in one atomic exchange (renameat2 RENAME_EXCHANGE on Linux), so
there is no moment at which neither the old nor the new one exists.

A staging folder is named `.<output name>.qlora-<pid>-<host tag>.<random>`: a writer killed with
SIGKILL cannot clean up, so the next write into the same parent folder removes the staging folders
that are provably ours and dead (our prefix, this host, a pid that no longer runs). Folders are made
with mode 0o777 minus the umask, like a plain mkdir (tempfile.mkdtemp would give 0700), and before
the swap every file written into one gets 0o666 minus the umask, like a plain open(): safetensors
writes its files 0600, which would make a shared checkpoint unreadable to the rest of a team.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

from qlora.errors import UserError

log = logging.getLogger(__name__)

_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_STAGING = re.compile(r"^\..+\.qlora-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.[0-9a-z]+$")


class OutputWriteError(UserError, OSError):
    """Writing an output failed (disk full, permissions, ...); the message names the user's path."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove staging folders in `parent` left by writers of this host that are no longer running."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _STAGING.match(entry.name)
        if (match and entry.is_dir() and match["host"] == _HOST_TAG and int(match["pid"]) != os.getpid()
                and not _pid_alive(int(match["pid"]))):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left behind by an interrupted write", entry)
            removed.append(entry)
    return removed


def make_staging_dir(output_dir: Path) -> Path:
    """A new empty folder beside `output_dir`, named so that remove_stale_staging can prove it ours."""
    for _ in range(100):
        path = output_dir.parent / f".{output_dir.name}.qlora-{os.getpid()}-{_HOST_TAG}.{secrets.token_hex(4)}"
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any mkdir
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a staging folder beside {output_dir}")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # a filesystem without exchange support
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def staged_directory(output_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `output_dir`; on success it becomes `output_dir`, on
    any exception it is removed and `output_dir` is left as it was. An OSError (disk full, no
    permission) is re-raised naming `output_dir`, not the staging folder."""
    output_dir = Path(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(output_dir.parent)
        staging = make_staging_dir(output_dir)
    except OSError as err:
        raise OutputWriteError(f"could not write {output_dir}: {err.strerror or err}") from err
    try:
        yield staging
        _apply_umask(staging)
        _move_into_place(staging, output_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, UserError):
            raise OutputWriteError(f"could not write {output_dir}: {err.strerror or err}") from err
        raise


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def _apply_umask(staging: Path) -> None:
    """Every regular file under `staging` gets the mode a plain open() would give it (0o666 minus the
    umask), keeping any execute bits it has."""
    umask = _current_umask()  # read once: each read sets the process umask twice
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~umask)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if output_dir.exists():
        if _exchange(staging, output_dir):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old contents
            return
        # No atomic exchange: move the old one aside first; it is removed only once the new one is in place.
        retired = make_staging_dir(output_dir)
        os.replace(output_dir, retired / "contents")
        os.replace(staging, output_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, output_dir)
