"""Red team: the file broker under a hostile worker and a changing tree.

The FIFO test runs ``trio_mojo._hostile:broker_open`` as a ``strict()``
worker; the race calls :meth:`FileBroker.open` in this process (what
``serve`` runs for each request) while another thread swaps a directory
and a symlink under it, with each resolver.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from pathlib import Path
from typing import Final

import trio
from _redteam_support import STRICT, finding, request, require
from test_broker import resolver

from trio_mojo import BrokerError, FileAccess, FileBroker, open_worker

__all__ = ["resolver"]  # the fixture, from test_broker

BROKER_OPEN: Final = "trio_mojo._hostile:broker_open"


@finding(
    "the broker opens a path before it checks that it is a regular file: a "
    "worker that asks for a FIFO under its rule gets EACCES, but the parent has "
    "opened the FIFO for reading, which wakes a writer blocked in open() (and "
    "opening a device node runs its driver's open)"
)
async def test_the_broker_opens_nothing_it_refuses(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    opened: list[int] = []
    woken = threading.Event()

    def writer() -> None:  # a third party, waiting for a reader
        opened.append(os.open(fifo, os.O_WRONLY | os.O_CLOEXEC))
        woken.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        access = FileAccess.read_only(tmp_path)
        async with open_worker(
            BROKER_OPEN, sandbox=STRICT, file_access=access
        ) as worker:
            reply = await request(worker, {"path": str(fifo)})
        require(reply == {"opened": 0, "errno": "EACCES"}, f"not refused: {reply}")
        was_opened = await trio.to_thread.run_sync(woken.wait, 1.0)
    finally:
        if not woken.is_set():  # let the writer go
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        thread.join(10)
        for fd in opened:
            os.close(fd)
    assert not was_opened, "the broker opened the FIFO it refused"


_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(first: Path, second: Path) -> None:
    """``renameat2(RENAME_EXCHANGE)``: swap two names atomically."""
    if _libc.renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_a_symlink_swapped_in_during_the_resolution_never_leads_out(
    tmp_path: Path, resolver: str
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "dir").mkdir(parents=True)
    outside.mkdir()
    (root / "dir" / "file").write_bytes(b"inside")
    (outside / "file").write_bytes(b"outside every rule")
    (root / "link").symlink_to(outside)
    broker = FileBroker([FileAccess.read_only(root)])
    stop = threading.Event()

    def swap() -> None:  # root/dir is a directory, then a symlink out, ...
        while not stop.is_set():
            _exchange(root / "dir", root / "link")

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    served: dict[bytes, int] = {}
    refused: set[int] = set()
    try:
        for _ in range(3000):
            try:
                fd = broker.open(os.fsencode(root / "dir" / "file"), "r")
            except BrokerError as exc:
                refused.add(exc.errno or 0)
                continue
            with open(fd, "rb") as file:
                content = file.read()
            served[content] = served.get(content, 0) + 1
    finally:
        stop.set()
        swapper.join(10)
    assert set(served) <= {b"inside"}, served
    assert refused <= {errno.ELOOP, errno.ENOTDIR, errno.EXDEV}, refused
    require(served and refused, f"the race was not run: {served}, {refused}")
