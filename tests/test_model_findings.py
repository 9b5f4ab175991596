"""Findings of the model test (``test_model_channel.py``), one test each.

Each was ``xfail(strict=True)`` until the channel's owner fixed it (all
are fixed now: plain regression tests).
"""

from __future__ import annotations

import os

import pytest
import trio
from _helpers import fill_until_queued, raw_pair

from trio_mojo import Framing, Handle, Message, MessageType, open_channel


async def test_a_type_the_framing_cannot_carry_is_refused_before_any_wait() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    handle = Handle(read_end)
    try:
        with raw_pair() as (endpoint, _peer), trio.CancelScope() as scope:
            # The raw peer never reads: the queue fills and stays full.
            async with open_channel(
                endpoint, framing=Framing.IPCZ, send_queue_messages=1
            ) as channel:
                await fill_until_queued(channel)
                invalid = Message(b"legacy", [handle], MessageType.NORMAL_LEGACY)
                with trio.fail_after(1), pytest.raises(ValueError, match="IPCZ"):
                    await channel.send(invalid)
                assert not handle.closed, (
                    "the caller keeps the handles of an invalid message"
                )
                scope.cancel()  # leave without flushing to a peer that never reads
    finally:
        handle.close()
