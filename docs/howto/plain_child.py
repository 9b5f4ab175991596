"""A child that speaks the Mojo wire format with the standard library only.

It is started by plain_parent.py (any trio_mojo parent would do) with
--mojo-platform-channel-handle=N on its command line, and answers requests:

  b"upper" + one fd   -> the text read from the fd, in upper case
  b"pipe"             -> b"here", with the read end of a new pipe
"""

import os
import socket
import struct
import sys

HEADER = struct.Struct("<IHHH6x")  # num_bytes, num_header_bytes, type, num_handles
NORMAL = 1  # MessageType.NORMAL


def channel_from_argv() -> socket.socket:
    """The socket the parent passed, named by the switch."""
    prefix = "--mojo-platform-channel-handle="
    (fd,) = [int(arg[len(prefix) :]) for arg in sys.argv if arg.startswith(prefix)]
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)  # the fd arrives non-blocking, as Chromium passes it
    return sock


def receive_exactly(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    """Read size bytes; collect the fds that come with them."""
    data = b""
    while len(data) < size:
        chunk, new_fds, _flags, _addr = socket.recv_fds(sock, size - len(data), 253)
        if not chunk:
            raise EOFError("the parent closed the channel")
        data += chunk
        fds += new_fds
    return data


def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message: its payload and its fds."""
    fds: list[int] = []
    num_bytes, header_bytes, kind, num_handles = HEADER.unpack(
        receive_exactly(sock, HEADER.size, fds)
    )
    if kind != NORMAL or not HEADER.size <= header_bytes <= num_bytes:
        raise ValueError(
            f"unexpected header: type {kind}, sizes {header_bytes}/{num_bytes}"
        )
    body = receive_exactly(sock, num_bytes - HEADER.size, fds)
    if len(fds) != num_handles:
        raise ValueError(f"expected {num_handles} fds, got {len(fds)}")
    return body[header_bytes - HEADER.size :], fds


def send(sock: socket.socket, payload: bytes, fds: tuple[int, ...] = ()) -> None:
    """One message; its fds ride with its first byte."""
    message = HEADER.pack(HEADER.size + len(payload), HEADER.size, NORMAL, len(fds))
    message += payload
    sent = socket.send_fds(sock, [message], fds)
    if sent < len(message):
        sock.sendall(message[sent:])


def main() -> None:
    sock = channel_from_argv()
    while True:
        try:
            payload, fds = receive(sock)
        except EOFError:
            return  # a clean end: the parent's channel block ended
        if payload == b"upper" and len(fds) == 1:
            with open(fds.pop(), "rb") as file:
                send(sock, file.read(4096).upper())
        elif payload == b"pipe":
            read_end, write_end = os.pipe()
            os.write(write_end, b"written by the plain child")
            os.close(write_end)
            send(sock, b"here", (read_end,))
            os.close(read_end)  # the kernel passed its own reference on
        else:
            send(sock, b"unknown request")
        for fd in fds:
            os.close(fd)


main()
