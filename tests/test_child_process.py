"""A parent and a real child process: messages and fds across the boundary.

The endpoint goes to the child with ``pass_fds`` (its number is kept); the
child is either trio_mojo itself (``Endpoint.from_fd`` + ``open_channel``)
or a plain stdlib-socket script speaking the wire format by hand, so wire
compatibility is checked against an independent implementation too.
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap

import pytest
import trio
from _helpers import open_pair, pipe_tagged, read_tags

from trio_mojo import (
    DisconnectedError,
    Endpoint,
    Handle,
    Message,
    channel_pair,
    open_channel,
)

TRIO_MOJO_CHILD = textwrap.dedent(
    """
    import os, sys, trio, trio_mojo

    async def main(fd):
        endpoint = trio_mojo.Endpoint.from_fd(fd)
        async with trio_mojo.open_channel(endpoint) as channel:
            async for message in channel:
                with message:
                    if message.payload == b"write-into-this":
                        os.write(message.handles[0].fileno(), b"written by the child")
                        reply = trio_mojo.Message(b"done")
                    elif message.payload == b"send-me-a-pipe":
                        r, w = os.pipe()
                        os.write(w, b"from the child's pipe")
                        os.close(w)
                        reply = trio_mojo.Message(b"here", [trio_mojo.Handle(r)])
                    elif message.payload == b"inodes":
                        inodes = [os.fstat(h.fileno()).st_ino for h in message.handles]
                        reply = trio_mojo.Message(repr(inodes).encode())
                    else:
                        reply = trio_mojo.Message(b"echo:" + message.payload)
                    await channel.send(reply)

    trio.run(main, int(sys.argv[1]))
    """
)

STDLIB_CHILD = textwrap.dedent(
    """
    import array, os, socket, struct, sys

    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)

    def recv_exactly(n):
        data, fds = b"", []
        while len(data) < n:
            chunk, ancdata, flags, _ = sock.recvmsg(
                n - len(data), socket.CMSG_SPACE(253 * 4)
            )
            assert chunk, "unexpected end of stream"
            data += chunk
            for level, kind, payload in ancdata:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(got)
        return data, fds

    header, fds = recv_exactly(16)
    num_bytes, num_header_bytes, mtype, num_handles = struct.unpack_from("<IHHH", header)
    assert (num_header_bytes, mtype) == (16, 1), header
    payload, more = recv_exactly(num_bytes - 16)
    fds += more
    assert num_handles == len(fds) == 1, (num_handles, fds)
    reply = payload + b" / read: " + os.read(fds[0], 100)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    head = struct.pack("<IHHH6x", 16 + len(reply), 16, 1, 1)
    sock.sendmsg([head + reply], rights)  # the fd goes back
    if sys.argv[2] == "die-mid-message":
        sock.sendall(struct.pack("<IHHH6x", 16 + 100, 16, 1, 0) + b"partial")
        os._exit(0)
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    """
)


async def spawn(
    nursery: trio.Nursery, script: str, endpoint: Endpoint, *args: str
) -> trio.Process:
    """Start ``python -c script <fd> args...`` with ``endpoint`` passed in."""
    fd = endpoint.fileno()
    process: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            [sys.executable, "-c", script, str(fd), *args],
            pass_fds=[fd],
            check=False,
            capture_stderr=True,
        )
    )
    endpoint.close()  # the child has its copy now
    return process


async def test_trio_mojo_child_exchanges_messages_and_fds() -> None:
    ours, theirs = channel_pair()
    with ours, theirs, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await spawn(nursery, TRIO_MOJO_CHILD, theirs)
            async with open_channel(ours) as channel:
                # Plain messages of every kind of size.
                for payload in (b"", b"hello", bytes(range(256)) * 4096):
                    await channel.send(Message(payload))
                    assert (await channel.receive()).payload == b"echo:" + payload
                # An fd to the child: it writes into our pipe.
                r, w = os.pipe()
                with Handle(r) as read_end:
                    await channel.send(Message(b"write-into-this", (Handle(w),)))
                    assert (await channel.receive()).payload == b"done"
                    assert os.read(read_end.fileno(), 100) == b"written by the child"
                    assert os.read(read_end.fileno(), 100) == b""  # its copy is closed
                # An fd from the child.
                await channel.send(Message(b"send-me-a-pipe"))
                with await channel.receive() as message:
                    assert message.payload == b"here"
                    (pipe,) = message.handles
                    assert os.read(pipe.fileno(), 100) == b"from the child's pipe"
                # Many fds, identity and order preserved across processes.
                with pipe_tagged(200) as pipes:
                    inodes = [os.fstat(h.fileno()).st_ino for h in pipes]
                    await channel.send(Message(b"inodes", pipes))
                    assert (await channel.receive()).payload == repr(inodes).encode()
            # Leaving the block: the child sees EndOfChannel and exits.
    assert process.returncode == 0, process.stderr


@pytest.mark.parametrize("ending", ["clean", "die-mid-message"])
async def test_stdlib_child_speaks_the_wire_format(ending: str) -> None:
    ours, theirs = channel_pair()
    with ours, theirs, trio.fail_after(30), pipe_tagged(1, first=42) as pipes:
        inode = os.fstat(pipes[0].fileno()).st_ino
        async with trio.open_nursery() as nursery:
            process = await spawn(nursery, STDLIB_CHILD, theirs, ending)
            async with open_channel(ours) as channel:
                await channel.send(Message(b"ping", pipes))
                with await channel.receive() as message:
                    assert message.payload == b"ping / read: *"
                    (back,) = message.handles
                    assert os.fstat(back.fileno()).st_ino == inode
                if ending == "clean":
                    with pytest.raises(trio.EndOfChannel):
                        await channel.receive()
                else:
                    with pytest.raises(DisconnectedError, match="inside a message"):
                        await channel.receive()
    assert process.returncode == 0, process.stderr


FD_PROBE = textwrap.dedent(
    """
    import os, sys
    print(" ".join(
        "open" if os.path.exists(f"/proc/self/fd/{fd}") else "closed"
        for fd in map(int, sys.argv[1:])
    ))
    """
)


async def test_received_fds_are_not_inherited_by_spawned_children() -> None:
    # MSG_CMSG_CLOEXEC: a child spawned without close_fds does not get the
    # fds we received.  The control (an inheritable dup) shows that it would
    # see them otherwise.
    with pipe_tagged(3) as pipes:
        async with open_pair() as (left, right):
            await left.send(Message(b"fds", pipes))
            with await right.receive() as message:
                received = [h.fileno() for h in message.handles]
                assert read_tags(message.handles) == [0, 1, 2]
                assert [os.get_inheritable(fd) for fd in received] == [False] * 3
                control = os.dup(received[0])
                try:
                    os.set_inheritable(control, True)
                    result = await trio.run_process(
                        [
                            sys.executable,
                            "-c",
                            FD_PROBE,
                            *map(str, received),
                            str(control),
                        ],
                        close_fds=False,
                        capture_stdout=True,
                    )
                finally:
                    os.close(control)
    assert result.stdout.split() == [b"closed"] * 3 + [b"open"]
