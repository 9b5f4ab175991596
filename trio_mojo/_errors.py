"""The exceptions trio_mojo raises.

The tree::

    trio.BrokenResourceError
     └── ChannelError                 the channel cannot carry messages any more
          ├── DisconnectedError       the peer went away: EOF inside a message,
          │                           ECONNRESET, EPIPE on a write
          ├── MalformedMessageError   the peer broke the protocol or one of our
          │                           limits (Mojo's kReceivedMalformedData)
          └── FlushTimeoutError       a graceful close could not flush the
                                      outgoing queue in time (also a
                                      trio.TooSlowError)

    Exception
     ├── WorkerError                  a worker process failed or died
     │    └── WorkerTargetError       its target cannot be run (also a
     │                                ValueError): one line says why
     └── SandboxUnavailableError      a required sandbox layer cannot be applied

    OSError
     └── BrokerError                  the parent's file broker refused or failed
                                      an open request (raised in the worker)

Misuse of the API by the local program (a bad argument, a closed handle, a
message over the limit) raises the built-in ``ValueError`` / ``TypeError``
before anything is queued, and using a closed channel raises
``trio.ClosedResourceError``, exactly as Trio's own streams do.

Every channel failure is raised as a single exception (never an
``ExceptionGroup``) with the underlying cause chained as ``__cause__``.
"""

from __future__ import annotations

import trio

__all__ = [
    "BrokerError",
    "ChannelError",
    "DisconnectedError",
    "FlushTimeoutError",
    "MalformedMessageError",
    "SandboxUnavailableError",
    "WorkerError",
    "WorkerTargetError",
]


class ChannelError(trio.BrokenResourceError):
    """The channel failed and can no longer send or receive.

    A subclass of :class:`trio.BrokenResourceError`, so code written against
    Trio's stream and channel ABCs handles it without knowing trio_mojo.
    """


class DisconnectedError(ChannelError):
    """The peer went away.

    Raised for an end of stream inside a message (the peer died mid-write), a
    connection reset, or a write to a peer that closed its end.  A clean end
    of stream at a message boundary is not an error: ``receive`` raises
    :class:`trio.EndOfChannel` instead.  Mojo calls this ``kDisconnected``.
    """


class MalformedMessageError(ChannelError):
    """The peer broke the wire protocol or exceeded one of our limits.

    Mojo calls this ``kReceivedMalformedData``; Chromium kills a renderer that
    causes it.  The message names the field and the offending values.  Once
    raised, the decoder or channel that raised it is failed for good and every
    file descriptor it held has been closed.
    """


class FlushTimeoutError(ChannelError, trio.TooSlowError):
    """A graceful close gave up waiting for the outgoing queue to drain.

    The messages that were still queued have been discarded and their file
    descriptors closed.
    """


class WorkerError(Exception):
    """A worker process failed: it exited unexpectedly or could not start.

    ``returncode`` is the exit status as :attr:`subprocess.Popen.returncode`
    reports it (negative for a signal, ``None`` if unknown) and
    ``stderr_tail`` the last part of what the worker wrote to its standard
    error, decoded leniently, with every control character but newline and
    tab escaped (``\\x1b``, ``\\r``, ``\\u202e``, ...): the worker's output is
    hostile, and this text ends up in logs and terminals.
    """

    def __init__(
        self, message: str, *, returncode: int | None = None, stderr_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def __str__(self) -> str:
        text = super().__str__()
        if self.returncode is not None:
            text += f" (exit status {self.returncode})"
        if self.stderr_tail:
            text += "\n--- worker stderr (tail) ---\n" + self.stderr_tail
        return text


class WorkerTargetError(WorkerError, ValueError):
    """A worker's target cannot be run; the message, one line, says why and
    what to do.

    Raised by :func:`open_worker`, :func:`open_zygote` (a preload) and
    :func:`open_worker_pool` for every problem with a target:

    * before anything starts, in the parent: a malformed
      ``"package.module:function"``; a function object a worker cannot
      import by its name (a lambda, a closure, a method, a function of
      ``__main__``), or one that is not an ``async def``; a module that the
      worker's interpreter cannot import in isolated mode (``python -I``);
    * when the worker (or the zygote) imports it, before its sandbox: the
      module raised on import, the function does not exist, or it is not an
      ``async def``.  The worker reports that on its channel, exits, and
      ``returncode`` and ``stderr_tail`` (an import's traceback) are set.

    It is a :class:`WorkerError` (the worker cannot start: a pool fails with
    it at once) and a :class:`ValueError` (the ``target`` argument is wrong,
    or its environment).  ``target`` is the target as a
    ``"package.module:function"`` string when there is one, else its
    ``repr``.
    """

    def __init__(
        self,
        message: str,
        *,
        target: str = "",
        returncode: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message, returncode=returncode, stderr_tail=stderr_tail)
        self.target = target

    def __str__(self) -> str:
        return str(self.args[0])


class SandboxUnavailableError(Exception):
    """A sandbox layer the policy requires cannot be applied here.

    Raised before the worker runs any target code.  ``layer`` names the layer
    (``"seccomp"``, ``"landlock"``, ``"userns"``, ...) and ``reason`` says why,
    with a hint at the fix.
    """

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer}: {reason}")
        self.layer = layer
        self.reason = reason


class BrokerError(OSError):
    """The parent's file broker refused (or failed) to open a file.

    Raised in a worker by :meth:`BrokerClient.open`.  It is an
    :class:`OSError` carrying the ``errno`` the parent chose (``EACCES`` for a
    path outside every rule or a write on a read-only rule, ``ENOENT`` when
    the file does not exist, ...), a message saying why, and the path asked
    for as ``filename``.
    """
