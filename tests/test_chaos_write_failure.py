"""A local write failure must not leave the peer waiting for a half-sent message.

When the writer fails with anything but a vanished peer (``sendmsg``
refusing an fd, as here: Linux refuses to pass an io_uring fd, ``EINVAL``;
in production also ``ETOOMANYREFS`` when an unprivileged sender has too
many fds in flight, or ``ENOBUFS``), the channel stops writing and drops
its queue.  It used to keep the socket open for reading only: if the
failure came in the middle of a message, the peer had its first bytes and
waited for the rest forever; if our side then waited for the peer's reply,
both hung until someone closed.

Fixed: on a write failure that is not a disconnect the channel shuts the
socket down for writing (``SHUT_WR``), so the peer reads the end of the
stream (inside a message that is its ``DisconnectedError``) while our
reader goes on; ``send`` raises the failure.

(This finding was first shown by closing a queued handle after ``send``;
``send`` now takes the fds out of the caller's handles, so that mistake
can no longer fail the writer: see ``test_chaos_handle_ownership.py``.)
"""

from __future__ import annotations

import ctypes
import errno

import pytest
import trio
from _helpers import open_pair

from trio_mojo import ChannelError, DisconnectedError, Handle, Message

_IO_URING_SETUP = 425  # the same number on every Linux architecture
_IO_URING_PARAMS_SIZE = 120


def _io_uring_handle() -> Handle:
    """An io_uring instance's fd: one that ``sendmsg`` refuses to pass."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(_IO_URING_PARAMS_SIZE)
    fd = libc.syscall(_IO_URING_SETUP, 1, params)
    if fd < 0:
        code = ctypes.get_errno()
        pytest.skip(f"io_uring_setup failed ({errno.errorcode.get(code, code)})")
    return Handle(fd)


async def test_a_write_failure_never_leaves_the_peer_waiting_for_a_half_sent_message() -> (
    None
):
    async with open_pair() as (left, right):
        await left.send(Message(bytes(4 << 20)))  # partly written, the rest queued
        # Its fd goes out with the end of the message before it: sendmsg
        # refuses it (EINVAL), and that end never leaves.
        await left.send(Message(b"one", [_io_uring_handle()]))
        received = 0
        with trio.move_on_after(5) as waited:
            try:
                while received < 2:
                    (await right.receive()).close()
                    received += 1
            except DisconnectedError:
                pass  # the end of the stream inside the message: not stuck
        assert not waited.cancelled_caught, (
            f"the peer still waits for the rest of a message ({received} received)"
        )
        assert received == 0  # the first message was cut short
        with pytest.raises(ChannelError, match="Invalid argument"):
            await left.send(Message(b"after"))  # the write failure reaches us
