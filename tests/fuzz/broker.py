"""Rule: any open request, decoded and matched by the file broker against a tree of symlinks, '..', FIFOs, sockets and devices, gives a documented BrokerError or a close-on-exec fd of exactly the regular file it names, inside a rule that allows its mode; nothing outside the read-write root changes and no fd leaks.

Input layout (read with :class:`~fuzz._input.FuzzInput`)::

    u8  flags    bit 0 raw request, bit 1 resolve with the fallback walk
                 (as on kernels without openat2)
    raw:         the rest is the request payload, as a worker would send it
    otherwise:   u8 mode index (0..3 valid, 4 and up not), u8 base (an index
                 into BASES: a rule root, a path outside, "/", ""), the rest
                 is appended to the base's path

The request goes through ``_decode_request`` and :meth:`FileBroker.open`,
the two steps :meth:`FileBroker.serve` runs for each request.  The tree
(see :func:`build_tree`) is built once per process in ``workdir``; files a
write creates or truncates in the read-write root are restored after each
input.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from _fds import open_fds

from trio_mojo import BrokerError, FileAccess, FileBroker
from trio_mojo._workers import _broker

from ._input import FuzzInput

__all__ = ["BASES", "build_tree", "open_target"]

BASES = ("ro", "rw", "single.txt", ".", "", "/", "ro-sibling", "/proc/self/fd")
"""Where a structured request's path starts: names relative to the tree's
base directory, except ``""`` (a relative path) and the absolute ones."""
RW_CONTENT = b"0123456789"
_ACCESS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "a": os.O_WRONLY, "r+": os.O_RDWR}


def build_tree(base: Path) -> None:
    """The rule roots and their traps, under ``base`` (which must exist)."""
    ro, rw, outside = base / "ro", base / "rw", base / "outside"
    for directory in (ro, ro / "sub", ro / "sub" / "deeper", rw, rw / "subdir"):
        directory.mkdir()
    outside.mkdir()
    (base / "ro-sibling").mkdir()
    (base / "secret.txt").write_bytes(b"secret")
    (base / "single.txt").write_bytes(b"single")
    (outside / "x.txt").write_bytes(b"outside")
    (base / "ro-sibling" / "file.txt").write_bytes(b"sibling")
    (ro / "file.txt").write_bytes(b"allowed")
    (ro / "sub" / "nested.txt").write_bytes(b"nested")
    (ro / "sub" / "deeper" / "x.txt").write_bytes(b"deeper")
    (rw / "existing.txt").write_bytes(RW_CONTENT)
    for directory in (ro, rw):
        (directory / "link-out").symlink_to(base / "secret.txt")
        (directory / "dir-link").symlink_to(outside)
        (directory / "dev-link").symlink_to(os.devnull)
        (directory / "loop").symlink_to(directory / "loop")
        os.mkfifo(directory / "fifo")
        os.mknod(directory / "sock", stat.S_IFSOCK | 0o600)  # no path length limit
    (ro / "link-in").symlink_to(ro / "file.txt")
    (ro / "rel-link").symlink_to("file.txt")
    (ro / "sub" / "up").symlink_to("../file.txt")
    (rw / "dangling").symlink_to(base / "created-through-a-link")
    with contextlib.suppress(OSError):  # a device node needs CAP_MKNOD
        os.mknod(ro / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))


class _Tree:
    """The built tree, the broker over it, and a snapshot to restore."""

    def __init__(self, base: Path) -> None:
        self.base = base.resolve()
        self.rw = self.base / "rw"
        self.broker = FileBroker(
            [
                FileAccess.read_only(self.base / "ro"),
                FileAccess.read_write(self.rw),
                FileAccess.read_only(self.base / "single.txt"),
            ]
        )
        self.rw_entries = self._rw_entries()
        self.snapshot = self._outside_rw()

    def _rw_entries(self) -> set[str]:
        found: set[str] = set()
        for top, dirs, files in os.walk(self.rw):
            found.update(os.path.join(top, name) for name in dirs + files)
        return found

    def _outside_rw(self) -> dict[str, tuple[int, int, int]]:
        """Every entry outside the read-write root: mode, size, mtime."""
        entries = {}
        for top, dirs, files in os.walk(self.base):
            if Path(top) == self.rw:
                dirs.clear()
                continue
            for name in dirs + files:
                if Path(top, name) == self.rw:
                    continue  # its entries come and go (restore() checks them)
                st = os.lstat(os.path.join(top, name))
                entries[os.path.join(top, name)] = (
                    st.st_mode,
                    st.st_size,
                    st.st_mtime_ns,
                )
        return entries

    def restore(self) -> None:
        """Undo what writes did in the read-write root; check nothing else."""
        for path in self._rw_entries() - self.rw_entries:
            os.unlink(path)  # only files: a write never creates a directory
        existing = self.rw / "existing.txt"
        if existing.read_bytes() != RW_CONTENT:
            existing.write_bytes(RW_CONTENT)
        assert self._outside_rw() == self.snapshot, "a file outside rw changed"

    def request(self, reader: FuzzInput, flags: int) -> bytes:
        if flags & 1:
            return reader.rest()
        mode, base = reader.u8(), BASES[reader.u8() % len(BASES)]
        if base and not base.startswith("/"):
            base = os.fspath(self.base / base)
        return b"OPEN" + bytes((mode % 6,)) + os.fsencode(base) + reader.rest()


def check(data: bytes, tree: _Tree) -> None:
    """Decode and serve the request ``data`` describes; check the rule."""
    reader = FuzzInput(data)
    flags = reader.u8()
    payload = tree.request(reader, flags)
    fds_before = len(open_fds())
    state = _broker._openat2_state
    saved = dict(state)
    if flags & 2:
        state["works"] = False
    try:
        try:
            path, mode = _broker._decode_request(payload)
            fd = tree.broker.open(path, mode)
        except BrokerError as exc:
            refusal: BrokerError | None = exc
        else:
            refusal = None
            try:
                _check_served(tree, path, mode, fd)
            finally:
                os.close(fd)
        if refusal is not None:
            assert isinstance(refusal.errno, int), refusal
            assert refusal.errno > 0, refusal
    finally:
        state.clear()
        state.update(saved)
        tree.restore()
    assert len(open_fds()) == fds_before, "fds leaked"


def _check_served(tree: _Tree, path: bytes, mode: str, fd: int) -> None:
    st = os.fstat(fd)
    assert stat.S_ISREG(st.st_mode), f"served a non-regular file for {path!r}"
    opened = os.readlink(f"/proc/self/fd/{fd}")
    assert opened == os.path.normpath(os.fsdecode(path)), (
        f"asked for {path!r}, got {opened!r}"
    )
    roots = [rule.root for rule in tree.broker.rules if mode == "r" or rule.writable]
    assert any(
        opened == root or opened.startswith(root.rstrip("/") + "/") for root in roots
    ), f"{opened!r} is outside every rule that allows mode {mode!r}"
    assert not os.get_inheritable(fd), "served fd is not close-on-exec"
    assert os.get_blocking(fd), "served fd is non-blocking"
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == _ACCESS[mode], (mode, flags)
    assert bool(flags & os.O_APPEND) == (mode == "a"), (mode, flags)
    if mode == "w":
        assert st.st_size == 0, "'w' did not truncate"


@contextlib.contextmanager
def open_target(workdir: Path) -> Iterator[Callable[[bytes], None]]:
    """Build the tree in ``workdir`` and yield the one-input function."""
    base = workdir / "broker-tree"
    base.mkdir()
    build_tree(base)
    tree = _Tree(base)
    yield lambda data: check(data, tree)
