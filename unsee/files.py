"""Files: atomic writes, the temporaries of killed writes, checks on paths before any work, and file-name slugs.

Atomic writes (:func:`atomic_write`): a reader sees the old file or the new one, never half of one. The
new file is written inside a private temporary folder beside the target,

    .<name>.unsee-<host>-<pid>-<random>.tmp/<name>

(so that a writer that makes temporaries of its own, as safetensors' does, makes them in there too), then
moved onto the target; the temporary folder is removed on success and on any error. A process that is
killed (SIGKILL, power loss) cannot clean up: its temporary folder stays, and the next atomic write in the
same folder removes it (:func:`remove_stale_temporaries`), once the process named in it is gone. The host is
in the name so that a folder shared between machines never loses the temporary of a write still running
elsewhere.

The checks (:func:`output_problem`, :func:`model_file_problem`) return a one-line description of what is
wrong with a path, or None; the command line turns them into errors before loading any model.

:func:`slug` turns a prompt or a concept into a safe piece of a file name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

__all__ = ["atomic_write", "remove_stale_temporaries", "stale_temporaries", "is_temporary", "output_problem",
           "model_file_problem", "slug"]

_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..*\.unsee-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+\.tmp$", re.DOTALL)
# where a process cannot be asked whether it is alive (not POSIX), a temporary this old counts as stale
_STALE_AFTER_S = 24 * 3600
_NAME_CHARS = 100  # of the target's name in the temporary's name: file names stay under 255 bytes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _temporary_prefix(name: str) -> str:
    return f".{name[:_NAME_CHARS]}.unsee-{_host()}-{os.getpid()}-"


def is_temporary(name: str) -> bool:
    """Whether ``name`` (a file or folder name) is the temporary of an unsee atomic write."""
    return _TEMP_NAME.match(name) is not None


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # it exists, under another user (or we cannot tell: keep it)
        return True
    return True


def stale_temporaries(folder: Union[str, os.PathLike]) -> Iterator[Path]:
    """The temporaries in ``folder`` left by atomic writes whose process is gone (killed before it could clean up)."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    host = _host()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            continue
        if os.name == "posix":
            if match["host"] != host or _process_alive(int(match["pid"])):
                continue
        else:  # os.kill(pid, 0) would end the process on Windows: judge by age instead
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < _STALE_AFTER_S:
                    continue
            except OSError:
                continue
        yield Path(entry.path)


def remove_stale_temporaries(folder: Union[str, os.PathLike]) -> list[Path]:
    """Remove the temporaries of killed atomic writes from ``folder``; returns what was removed."""
    removed = []
    for path in stale_temporaries(folder):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` with a temporary path beside ``path``, flush the file to disk, then move it onto
    ``path`` (and flush the folder, where the platform allows).

    The folder is created if needed; temporaries that killed writes left in it are removed first (see the
    module docstring). The file gets the permissions a plain ``open(path, "w")`` would give it. On success and
    on any error the temporary folder (with whatever ``write`` put in it) is removed; on an error ``path`` is
    left as it was.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    workdir = tempfile.mkdtemp(prefix=_temporary_prefix(path.name), suffix=_TEMP_SUFFIX, dir=folder)
    tmp = os.path.join(workdir, path.name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _can_create_in(folder: Path) -> Optional[str]:
    """None when a file can be created in ``folder`` (tried with a temporary file, removed at once)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_temporary_prefix("probe"), suffix=_TEMP_SUFFIX, dir=folder)
    except OSError as error:
        return error.strerror or type(error).__name__
    os.close(fd)
    os.unlink(probe)
    return None


def output_problem(path: Union[str, os.PathLike], folder: bool = False, create_parents: bool = True,
                   write_test: bool = True) -> Optional[str]:
    """What stops unsee from writing ``path`` (a file, or with ``folder=True`` a folder), or None.

    ``create_parents``: missing folders above ``path`` will be created (else the parent folder must exist).
    ``write_test``: also try to create (and at once remove) a file where ``path`` goes.
    """
    path = Path(path).expanduser()
    if not str(path).strip():
        return "the path is empty"
    if os.path.lexists(path):
        if folder and not path.is_dir():
            return f"{path} exists and is not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
        if not folder and not path.is_file():
            return f"{path} exists and is not a regular file"
    parent = path if (folder and path.is_dir()) else path.parent
    if not parent.is_dir():
        if not create_parents:
            return f"the folder {parent} does not exist"
        existing = _nearest_existing(parent)
        if not existing.is_dir():
            return f"{existing} is not a folder"
        parent = existing
    if write_test:
        problem = _can_create_in(parent)
        if problem is not None:
            return f"cannot write in {parent} ({problem})"
    return None


_PICKLE_PROTOCOLS = range(2, 6)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header


def model_file_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """For a single-file model checkpoint: None if its first bytes look like a checkpoint, else why not.

    Reads the safetensors header (``.safetensors``) or the first bytes (a zip archive as ``torch.save``
    writes it, or a pickle) and never echoes the file's contents.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if path.suffix == ".safetensors":
                head = handle.read(8)
                if len(head) < 8:
                    return f"{path} is too short to be a safetensors file"
                (length,) = struct.unpack("<Q", head)
                if length < 2 or length > min(_MAX_HEADER, size - 8):
                    return f"{path} is not a safetensors file (its header length is impossible)"
                try:
                    header = json.loads(handle.read(length))
                except (ValueError, RecursionError, UnicodeDecodeError):
                    return f"{path} is not a safetensors file (its header is not JSON)"
                if not isinstance(header, dict) or not any(k != "__metadata__" for k in header):
                    return f"{path} is not a safetensors checkpoint (it holds no tensors)"
                return None
            head = handle.read(4)
    except OSError as error:
        return f"cannot read {path} ({error.strerror or type(error).__name__})"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        return None
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:  # a legacy torch.save pickle
        return None
    return f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)"


def slug(text: str, fallback: str = "concept", limit: int = 40) -> str:
    """``text`` as a piece of a file name: lower case, every run of characters other than ``a-z0-9`` one ``-``, no
    ``-`` at either end, at most ``limit`` characters; ``fallback`` when nothing is left ("Van Gogh!" -> "van-gogh")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or fallback
