"""A small file system that a test can fill: a tmpfs mounted in the test's directory."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(mount_point: Path, size_mb: int) -> Iterator[Path]:
    """Mount a ``size_mb`` tmpfs at ``mount_point`` (root only; the test is skipped when the
    mount is refused) and unmount it afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(directory: Path, keep_free: int = 0) -> Path:
    """Write a file until only ``keep_free`` bytes are free on the file system (0: until it is
    full); remove the file to give the space back."""
    filler = directory / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if keep_free:
            st = os.statvfs(directory)
            os.write(fd, b"\0" * max(0, st.f_bavail * st.f_frsize - keep_free))
            return filler
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler
