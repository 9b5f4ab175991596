"""``send`` refuses a Handle that an earlier, still queued message carries.

``send`` takes ownership of a message's handles and refuses a closed one,
but it could not tell a handle it already owned: sending the same
:class:`Handle` again while the first message waited in the send queue was
accepted.  If both messages leave in one ``sendmsg`` the peer gets two fds
for one; if not, the first write closes the handle and planning the second
raises inside the writer, so the channel's write side fails for good with
``ChannelError("writing failed: ValueError(...closed Handle)")`` at a later
``send`` — a local mistake reported late, as a channel failure.

Fixed: ``send`` moves each fd out of the caller's Handle into the send
queue (``take_all``) when it accepts the message, so the caller's Handle
reads as closed at once and a second ``send`` of it is the
documented ``ValueError`` before anything is queued (and closing it does
nothing).
"""

from __future__ import annotations

import os

import pytest
import trio
from _helpers import raw_pair

from trio_mojo import Handle, Message, open_channel


async def test_a_handle_still_queued_in_an_earlier_message_is_refused() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    handle = Handle(read_end)
    others = [Handle.dup(handle) for _ in range(127)]
    with raw_pair() as (endpoint, peer), trio.fail_after(10):
        async with trio.open_nursery() as nursery, open_channel(endpoint) as channel:
            # 4 MiB the peer has not read yet: what follows stays queued.
            await channel.send(Message(bytes(4 << 20)))
            # 128 fds: the next message's fd cannot join its sendmsg.
            await channel.send(Message(b"one", [handle, *others]))
            try:
                with pytest.raises(ValueError, match=r"(?i)handle"):
                    await channel.send(Message(b"two", [handle]))
            finally:
                nursery.start_soon(peer.at_eof)  # now read everything
            await channel.send(Message(b"three"))  # the channel still works
