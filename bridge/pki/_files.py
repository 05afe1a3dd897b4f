"""Small filesystem helpers for the PKI directory: secret files, atomic replacement, locking.

Rules the rest of :mod:`bridge.pki` relies on:

- A file holding a private key is created with mode 0600 from the start (``os.open`` with
  the mode, then ``fchmod`` in case the umask or an existing file said otherwise); it is
  never readable by others, not even for a moment.
- Files are written next to their final path and moved into place with ``os.replace``, so
  a reader (the sidecar watching ``revocations.pem``) sees the old or the new content,
  never half of it, and the file gets a new inode it can notice.
- ``create_*`` refuses to overwrite; ``replace_*`` replaces on purpose.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import PKIError

SECRET_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIRECTORY_MODE = 0o700


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PKIError(f"{path} already exists and will not be overwritten; move it away or choose another --dir") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        os.close(fd)


def _write_replacing(path: Path, data: bytes, mode: int) -> None:
    fd, temporary_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary_name)
        raise


def create_secret_file(path: Path, data: bytes) -> None:
    """Write a new file readable only by its owner (0600); refuse if it exists."""
    _write_new(path, data, SECRET_FILE_MODE)


def create_public_file(path: Path, data: bytes) -> None:
    """Write a new world-readable file (0644); refuse if it exists."""
    _write_new(path, data, PUBLIC_FILE_MODE)


def replace_secret_file(path: Path, data: bytes) -> None:
    """Atomically write or replace a file readable only by its owner (0600)."""
    _write_replacing(path, data, SECRET_FILE_MODE)


def replace_public_file(path: Path, data: bytes) -> None:
    """Atomically write or replace a world-readable file (0644)."""
    _write_replacing(path, data, PUBLIC_FILE_MODE)


def make_private_directory(path: Path) -> None:
    """Create ``path`` (and parents) if missing; a directory created here gets mode 0700."""
    if path.is_dir():
        return
    try:
        path.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True)
    except FileExistsError:
        raise PKIError(f"{path} exists and is not a directory; choose another --dir") from None
    os.chmod(path, PRIVATE_DIRECTORY_MODE)


def read_bytes(path: Path, what: str, hint: str) -> bytes:
    """Read a file, turning a missing or unreadable file into a :class:`PKIError`.

    ``what`` names the file for the message ("CA certificate"), ``hint`` says what to do.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{what} not found: {path}; {hint}") from None
    except IsADirectoryError:
        raise PKIError(f"{what} {path} is a directory, not a file; {hint}") from None
    except PermissionError:
        raise PKIError(f"no permission to read the {what} {path}; run as its owner or fix its mode") from None


@dataclass(frozen=True)
class FileStamp:
    """What ``stat`` says about a file; when it changes, the content may have changed.

    Watchers (the revocation list, certificates reloaded without a restart) compare
    stamps every few seconds and read the file only when its stamp moved: an atomic
    replacement gives a new inode, an in-place write a new size or mtime.
    """

    device: int
    inode: int
    size: int
    modified_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        """The stamp of ``path``, or None when it does not exist (yet)."""
        try:
            status = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_path`` so two commands never edit DIR at once."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, SECRET_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
