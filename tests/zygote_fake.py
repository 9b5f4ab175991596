"""A fake zygote that breaks the control protocol in the way it is told.

Started in place of ``trio_mojo._workers._zygote_main`` (see
``_zygote_support.interpreter``); ``ZYGOTE_FAKE`` in its environment picks
the fault:

* ``unknown-exit``: ready, then the exit of a process it never forked;
* ``second-ready``: ready, then ``ready`` again as its reply;
* ``wrong-id``: ready, then a reply to a request nobody made;
* ``silent``: never says anything;
* ``garbage``: a first message that is not JSON;
* ``refused-first``: a reply before ``ready``.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys

from trio_mojo import encode_message, recover_endpoint


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(encode_message(payload))


def _reply(sock: socket.socket, reply: dict[str, object]) -> None:
    _send(sock, json.dumps(reply).encode())


def _take_a_request(sock: socket.socket) -> None:
    _, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
    for _, _, data in ancdata:
        for fd in array.array("i", data[: len(data) - len(data) % 4]):
            os.close(fd)


def main() -> None:
    fault = os.environ["ZYGOTE_FAKE"]
    sock = socket.socket(fileno=recover_endpoint(sys.argv).detach())
    sock.setblocking(True)
    ready = {"kind": "ready", "pid": os.getpid(), "preloaded": []}
    if fault == "garbage":
        _send(sock, b"\xff not JSON")
    elif fault == "refused-first":
        _reply(sock, {"kind": "refused", "id": 1, "error": "too early"})
    elif fault != "silent":
        _reply(sock, ready)
        _take_a_request(sock)
        replies = {
            "unknown-exit": {"kind": "exited", "pid": 1, "returncode": 0},
            "second-ready": ready,
            "wrong-id": {"kind": "refused", "id": 999, "error": "not yours"},
        }
        _reply(sock, replies[fault])
    sock.recv(1)  # until the parent goes away


if __name__ == "__main__":
    main()
