"""A fake zygote that says ready, then answers a spawn request with nonsense.

Started in place of ``trio_mojo._workers._zygote_main`` (see
``_zygote_support.interpreter``): it reports the exit of a process it never
forked, which the parent must treat as a broken zygote.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys

from trio_mojo import encode_message, recover_endpoint


def _send(sock: socket.socket, reply: dict[str, object]) -> None:
    sock.sendall(encode_message(json.dumps(reply).encode()))


def main() -> None:
    sock = socket.socket(fileno=recover_endpoint(sys.argv).detach())
    sock.setblocking(True)
    _send(sock, {"kind": "ready", "pid": os.getpid(), "preloaded": []})
    _, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
    for _, _, data in ancdata:
        for fd in array.array("i", data[: len(data) - len(data) % 4]):
            os.close(fd)
    _send(sock, {"kind": "exited", "pid": 1, "returncode": 0})
    sock.recv(1)  # until the parent goes away


if __name__ == "__main__":
    main()
