"""The spool: where received instances live on disk, written so that an acknowledgement is true.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Every path
component is a UID that :func:`dicom_node.uids.is_valid_uid` accepted (digits and dots only), and
the resolved path is checked to lie inside the spool, so nothing from the network can choose
where a file goes.

:meth:`Spool.write` promises: when it returns, the bytes are in their final place and will still
be there after a power cut (temp file written and fsync'd, renamed over the final name, the
directory fsync'd). A crash before it returns leaves at most a stray ``*.part`` file in
``<spool>/.incoming``, which :meth:`Spool.clean_incoming` removes at start-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from pathlib import Path

from dicom_node.uids import is_valid_uid

INCOMING = ".incoming"


class SpoolError(OSError):
    """A file could not be written durably (disk full, I/O error, bad path)."""


class UnsafePathError(ValueError):
    """A UID was not valid, so no path may be built from it."""


class StoredPathError(ValueError):
    """A path kept in the database does not lie inside the spool, so it is not followed."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable, UID-addressed file store rooted at ``root``.

    ``fsync=False`` skips every fsync (only for throw-away test setups; acknowledgements are then
    no longer durable).
    """

    def __init__(self, root: Path | str, fsync: bool = True):
        self.root = Path(root).resolve()
        self._root_str = str(self.root)
        self._root_prefix = self._root_str.rstrip("/") + "/"
        self.fsync = fsync
        self.incoming = self.root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Directories already known to exist durably; saves a mkdir+fsync per instance.
        self._known_dirs: set[Path] = {self.root, self.incoming}
        self._dir_lock = threading.Lock()

    # -- paths ---------------------------------------------------------------------------------
    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The final path of an instance; raises :class:`UnsafePathError` for any invalid UID."""
        for name, uid in (("study", study_uid), ("series", series_uid), ("sop", sop_uid)):
            if not is_valid_uid(uid):
                raise UnsafePathError(f"invalid {name} UID {uid!r:.80}")
        path = f"{self._root_prefix}{study_uid}/{series_uid}/{sop_uid}.dcm"
        # Belt and braces: the UID alphabet cannot express '/' or '..', but check anyway. The
        # check is lexical (no syscalls): it guards against crafted UIDs, which is the threat;
        # resolving symlinks per instance cost ~15% of the store time. On strings: pathlib's
        # joins and parents cost as much as the rest of this method.
        dirname = os.path.dirname
        if dirname(dirname(dirname(os.path.normpath(path)))) != self._root_str:
            raise UnsafePathError(f"path escapes the spool: {path}")
        return Path(path)

    def relative(self, path: Path) -> str:
        """``path`` (inside the spool) in the form the database keeps (:func:`to_stored`). A
        normalised path under the resolved root, which every :meth:`path_for` path is, is cut
        lexically, without the syscalls of the general case."""
        text = str(path)
        if text.startswith(self._root_prefix) and os.path.normpath(text) == text:
            return text[len(self._root_prefix) :]
        return to_stored(path, self.root)

    # -- writing -------------------------------------------------------------------------------
    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        with self._dir_lock:
            if directory in self._known_dirs:
                return
            # Create each missing level and fsync its parent, so the new entry is durable too.
            missing = []
            d = directory
            while d != self.root and not d.is_dir():
                missing.append(d)
                d = d.parent
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
                if self.fsync:
                    _fsync_dir(d.parent)
            self._known_dirs.add(directory)

    def write_temp(self, chunks: list[bytes] | tuple[bytes, ...]) -> Path:
        """Write ``chunks`` to a new temp file in the spool and fsync it; returns its path.

        Step one of a durable write; :meth:`place` puts the file where it belongs.
        """
        tmp = self.incoming / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.discard(tmp)
            raise SpoolError(exc.errno, f"spool write failed: {exc.strerror or exc}") from exc
        return tmp

    def place(self, tmp: Path, path: Path, sync_dir: bool = True) -> int:
        """Rename the fsync'd temp file ``tmp`` over ``path``; returns the file size.

        With ``sync_dir=False`` the caller must call :meth:`sync_dir` on ``path.parent``
        before it relies on the new name being durable (the receiver overlaps that fsync with
        its database commit).
        """
        try:
            size = os.stat(tmp).st_size
            self._ensure_dir(path.parent)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one
        except OSError as exc:
            self.discard(tmp)
            raise SpoolError(exc.errno, f"spool rename failed: {exc.strerror or exc}") from exc
        if sync_dir:
            self.sync_dir(path.parent)
        return size

    def discard(self, tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)

    def write(self, path: Path, chunks: list[bytes] | tuple[bytes, ...]) -> int:
        """Durably write ``chunks`` (concatenated) to ``path`` (from :meth:`path_for`).

        When it returns, the file is complete at ``path`` and survives a power cut (temp file
        fsync'd, renamed, directory fsync'd). Replaces an existing file atomically. Returns the
        size. Raises :class:`SpoolError` on any failure, leaving no partial file behind.
        """
        return self.place(self.write_temp(chunks), path)

    def sync_dir(self, directory: Path) -> None:
        """fsync ``directory`` so renames into it are durable; raises :class:`SpoolError`."""
        if not self.fsync:
            return
        try:
            _fsync_dir(directory)
        except OSError as exc:
            raise SpoolError(exc.errno, f"directory fsync failed: {exc.strerror or exc}") from exc

    # -- housekeeping --------------------------------------------------------------------------
    def clean_incoming(self) -> int:
        """Remove temp files left by a crash; returns how many were removed."""
        n = 0
        for p in self.incoming.glob("*.part"):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
        return n

    def free_bytes(self) -> int:
        """Bytes available to us on the spool's file system."""
        return shutil.disk_usage(self.root).free


# -- paths the database keeps -----------------------------------------------------------------
# Every node may mount the shared spool at its own path, so the database keeps paths relative to
# the spool root and each node joins them with its own ``storage.spool_root``.


def to_stored(path: Path | str, spool_root: Path) -> str:
    """The form of ``path`` (a file or folder inside the spool) that the database keeps: relative
    to ``spool_root``, with ``/`` separators. Raises :class:`StoredPathError` for a path outside
    the spool."""
    path = Path(os.path.normpath(path))
    for candidate, root in ((path, spool_root), (path.resolve(), spool_root.resolve())):
        if candidate.is_relative_to(root) and candidate != root:
            return candidate.relative_to(root).as_posix()
    raise StoredPathError(f"{path} is not inside the spool {spool_root}")


def from_stored(stored: str, spool_root: Path) -> Path:
    """The path on this node of a path the database keeps.

    A relative value (written since paths are kept relative) is joined with ``spool_root``; one
    that climbs out of it (``..``) raises :class:`StoredPathError` and is never followed. An
    absolute value (a row written before) is used as is: such rows stay readable on the node that
    wrote them, and no rewrite of old rows is needed."""
    path = Path(stored)
    if path.is_absolute():
        return path
    if not stored or ".." in path.parts:
        raise StoredPathError(f"stored path {stored!r:.200} leaves the spool; not followed")
    return spool_root / path
