"""Worker targets and preloads for the zygote tests (not part of the package).

A zygote runs ``python -I``, which ignores ``PYTHONPATH``; the tests start
theirs through :func:`_zygote_support.interpreter`, a wrapper that puts this
directory on ``sys.path`` first, so that these modules can be preloaded and
named as targets.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat

from trio_mojo import Channel, Message
from trio_mojo._examples import _attempt

__all__ = ["print_to_stdout", "probe_zygote", "report_cwd", "report_layout"]


def _open_and_close(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY))


async def probe_zygote(channel: Channel) -> None:
    """Hostile after the fork: look for any way back to the zygote.

    The first message is ``b"<zygote pid>"``, or ``b"<zygote pid> kill"``
    to also try ``SIGKILL`` on it.  Replies with JSON: this process's fds
    (probed one by one, named ``socket:[inode]``, ``pipe:[inode]`` or
    ``other:[inode]``), and what signalling the zygote and opening its
    ``/proc`` entries gave (``"ALLOWED"`` or the errno name).
    """
    message = await channel.receive()
    message.close()
    zygote, _, kill = message.payload.decode().partition(" ")
    pid = int(zygote)
    fds = {}
    for fd in range(256):
        try:
            info = os.fstat(fd)
        except OSError:
            continue
        # As /proc/<pid>/fd names them (this worker may have no /proc).
        kind = "socket" if stat.S_ISSOCK(info.st_mode) else "pipe"
        if not stat.S_ISSOCK(info.st_mode) and not stat.S_ISFIFO(info.st_mode):
            kind = "other"
        fds[str(fd)] = f"{kind}:[{info.st_ino}]"
    result: dict[str, object] = {
        "fds": fds,
        "ppid": os.getppid(),
        "signal_zygote": _attempt(lambda: os.kill(pid, 0)),
        "open_zygote_mem": _attempt(lambda: _open_and_close(f"/proc/{pid}/mem")),
        "list_zygote_fds": _attempt(lambda: os.listdir(f"/proc/{pid}/fd")),
    }
    if kill:
        result["kill_zygote"] = _attempt(lambda: os.kill(pid, signal.SIGKILL))
    await channel.send(Message(json.dumps(result).encode()))


async def report_cwd(channel: Channel) -> None:
    """Reply to the first message with the worker's working directory."""
    (await channel.receive()).close()
    await channel.send(Message(os.getcwd().encode()))


async def print_to_stdout(channel: Channel) -> None:
    """On the first message, write a line to fd 1, then say ``b"done"``."""
    (await channel.receive()).close()
    os.write(1, b"a line on the worker's stdout\n")
    await channel.send(Message(b"done"))


async def report_layout(channel: Channel) -> None:
    """Reply to the first message with what ASLR and hash randomisation
    would make differ.

    JSON: the address of the ``os`` module object (heap), of libc's
    ``getpid`` (shared libraries), and ``hash()`` of a string (the hash
    secret).
    """
    (await channel.receive()).close()
    libc_getpid = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value
    layout = {"os": id(os), "libc": libc_getpid, "hash": hash("trio_mojo")}
    await channel.send(Message(json.dumps(layout).encode()))
