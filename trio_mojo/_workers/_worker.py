"""Workers: a Python child process connected by a channel, in one call.

Theory of operation
-------------------

:func:`open_worker` is an async context manager around one child:

1. **Before spawning** it checks the :class:`SandboxPolicy` against what can
   be applied (a required layer that cannot be raises
   :class:`SandboxUnavailableError` here, before any process exists).
2. It starts ``python -I -m trio_mojo._workers._bootstrap`` (isolated mode: no
   ``PYTHON*`` variables, no user site, no current directory on the path)
   with an environment built from an explicit allowlist, stdin from
   ``/dev/null``, a new session, stderr into a pipe whose tail we keep, and
   the channel's remote end passed as ``--mojo-platform-channel-handle=N``
   (see ``_spawn``).  With ``file_access`` rules a second channel carries
   the file broker (``_broker``).  With ``zygote=z`` the child is forked
   from that zygote instead (``_zygote``), and runs the same bootstrap
   steps from the import of its target on.
3. The child bootstrap (``_bootstrap``) closes every other fd, arms
   ``PR_SET_PDEATHSIG``, imports the target, locks down (with a PID
   namespace the child becomes a supervisor and the worker is its child,
   beside the namespace's init: ``_sandbox._pidns``), and sends its
   :class:`SandboxReport` as its first message.  We receive it (bounded by
   ``startup_timeout``), find the worker's host pid, check the report's
   claims in ``/proc/<pid>``, and only then send the go-ahead
   (``_handshake``) and yield the :class:`Worker`: no target code runs
   unverified.  A worker that dies or vanishes during the checks is a
   :class:`WorkerError`, never a sandbox error.
4. **Leaving the block normally** closes the channel (the target sees
   ``EndOfChannel``) and waits for the child: ``grace_period`` seconds,
   then ``SIGTERM``, then ``SIGKILL``, each sent to the worker process
   itself (through a pidfd).  **Leaving by an exception or a
   cancellation** kills it at once.  Either way the child is reaped in a
   shielded scope: no zombie, no orphan, no fd left behind.

A child that dies by itself with a non-zero status, or that fails to
start, surfaces as :class:`WorkerError` with its exit status and the tail of
its stderr (control characters escaped); when the body was leaving because
the channel broke (``DisconnectedError`` and friends), that error is
chained as the cause.

The file broker, when there is one, runs in a task of its own that also
owns its channel: a broker failure (a flooding or misbehaving worker) is
kept in ``FileBroker.error`` and never raised from this block.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
import sys
import unicodedata
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._errors import ChannelError, SandboxUnavailableError, WorkerError
from trio_mojo._sandbox import SandboxPolicy, SandboxReport
from trio_mojo._sandbox._pidns import worker_pid
from trio_mojo._sandbox._verify import verify_report

from ._broker import (
    BROKER_SWITCH,
    MAX_REQUEST_SIZE,
    FileAccess,
    FileBroker,
    sequence_of_rules,
)
from ._handshake import go_ahead
from ._spawn import (
    CHANNEL_SWITCH,
    ProcessLike,
    close_pipes,
    kill,
    reap,
    start_with_endpoints,
)

if TYPE_CHECKING:
    from ._zygote import Zygote

__all__ = ["ENV_ALLOWLIST", "Worker", "escape_controls", "open_worker"]

ENV_ALLOWLIST: Final = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Variables a worker inherits from the parent when ``env`` is not given."""
_log = logging.getLogger("trio_mojo")
STDERR_TAIL_BYTES: Final = 8192
_TAIL_SETTLE_TIME: Final = 1.0
"""Seconds to wait for the rest of a dead worker's stderr."""
_EXIT_WAIT: Final = 2.0
"""Seconds to wait for the exit status of a worker seen dying."""
BROKER_SEND_QUEUE: Final = 4
"""Replies the broker queues for a worker before it stops serving it."""
_BROKER_SNDBUF: Final = 4096
"""``SO_SNDBUF`` of the broker's socket: bounds the replies (and their
fds) in flight in the kernel towards a worker that does not read them."""


class Worker:
    """A running worker process, yielded by :func:`open_worker`.

    Attributes:
        channel: the open :class:`Channel` to the worker's target.
        sandbox_report: what the worker applied, checked against ``/proc``.
    """

    def __init__(
        self,
        process: ProcessLike,
        pid: int,
        channel: Channel,
        report: SandboxReport,
        tail: _Tail,
    ) -> None:
        self._process = process
        self._pid = pid
        self.channel: Final = channel
        self.sandbox_report: Final = report
        self._tail = tail
        self.broker: FileBroker | None = None

    @property
    def pid(self) -> int:
        """The host process id of the process that runs the target.

        In a PID namespace (the ``namespaces`` layer) that process is a
        child of the one ``open_worker`` started (its supervisor), or the
        zygote's own child when a root zygote forked it, and sees itself as
        pid 2 (``sandbox_report.pid``).
        """
        return self._pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the worker was reaped, else ``None``.

        Negative for a signal, as :attr:`subprocess.Popen.returncode`; the
        supervisor of a namespaced worker exits exactly as the worker did,
        and a zygote relays the status of the workers it forked.
        """
        return self._process.returncode

    @property
    def stderr_tail(self) -> str:
        """The last few KiB the worker wrote to its stderr.

        Decoded leniently, with every control character but newline and tab
        escaped (``\\x1b``, ``\\r``, ``\\u202e``, ...): the worker's output is
        hostile.
        """
        return self._tail.text()

    def __repr__(self) -> str:
        return f"<trio_mojo.Worker pid={self.pid} returncode={self.returncode}>"


class _Tail:
    """The last :data:`STDERR_TAIL_BYTES` of a stream."""

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._drained = trio.Event()

    def add(self, data: bytes | bytearray) -> None:
        self._chunks.append(bytes(data))
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= STDERR_TAIL_BYTES:
            self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        raw = b"".join(self._chunks)[-STDERR_TAIL_BYTES:]
        return escape_controls(raw.decode(errors="replace"))

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        try:
            async for chunk in stream:
                self.add(chunk)
        finally:
            self._drained.set()

    async def settle(self) -> None:
        """Wait until the stream ended, so the tail is complete (bounded).

        A child that exited has closed its stderr, but the drain task may
        not have read the last bytes yet (a traceback written just before
        the exit).  The wait is bounded because a grandchild can hold the
        pipe open.
        """
        with trio.move_on_after(_TAIL_SETTLE_TIME):
            await self._drained.wait()


_SHOWN_AS_IS: Final = frozenset("\n\t")
_INVISIBLE: Final = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
"""Unicode categories escaped in a worker's stderr: controls (C0, C1, DEL),
formatting characters (bidi overrides and isolates, zero-width ones),
surrogates, private-use and unassigned code points, line and paragraph
separators."""


def escape_controls(text: str) -> str:
    """``text`` with every control character but ``\\n`` and ``\\t`` escaped.

    A worker's stderr is hostile: written verbatim into a log or a terminal,
    an ``ESC`` sequence could rewrite the screen, a ``\\r`` overwrite the
    line, a bidi override reorder what is shown.  Such characters become
    ``\\x1b``, ``\\r``, ``\\u202e`` (their ``repr`` escape).
    """
    return "".join(
        repr(char)[1:-1]
        if char not in _SHOWN_AS_IS and unicodedata.category(char) in _INVISIBLE
        else char
        for char in text
    )


def _check_target(target: str) -> None:
    module, sep, function = target.partition(":")
    if not sep or not module or not function.isidentifier():
        raise ValueError(
            f"target must look like 'package.module:function', not {target!r}"
        )
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"target module {module!r} is not a dotted name")


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {key: os.environ[key] for key in ENV_ALLOWLIST if key in os.environ}
    if extra:
        env.update(extra)
    return env


async def _worker_error(
    what: str, process: ProcessLike, tail: _Tail, cause: BaseException | None = None
) -> WorkerError:
    if process.returncode is not None:
        await tail.settle()
    error = WorkerError(
        f"worker pid {process.forwarded_pid or process.pid} {what}",
        returncode=process.returncode,
        stderr_tail=tail.text(),
    )
    error.__cause__ = cause
    return error


async def _first_message(channel: Channel, process: ProcessLike, tail: _Tail) -> bytes:
    try:
        report = await channel.receive()
    except (trio.EndOfChannel, ChannelError) as exc:
        with trio.move_on_after(2):
            await process.wait()
        raise await _worker_error(
            "exited before it was ready", process, tail, exc
        ) from exc
    report.close()
    return report.payload


@asynccontextmanager
async def open_worker(
    target: str,
    *,
    sandbox: SandboxPolicy | None = None,
    zygote: Zygote | None = None,
    file_access: Sequence[FileAccess] | FileAccess = (),
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: int | None = subprocess.DEVNULL,
    startup_timeout: float = 30.0,
    grace_period: float = 5.0,
    **channel_options: Any,
) -> AsyncIterator[Worker]:
    """Start a worker process running ``target`` and yield a :class:`Worker`.

    The block is entered once the worker has applied its sandbox and the
    parent has checked it in ``/proc``; only then does the target run.
    Leaving the block normally closes the channel (the target sees
    ``EndOfChannel`` and should return) and waits ``grace_period`` seconds
    for the worker to exit, then sends ``SIGTERM``, then ``SIGKILL``.
    Leaving it by an exception or a cancellation kills the worker at once.
    Either way the worker is reaped before the block is left; a worker that
    exited with a non-zero status raises :class:`WorkerError`.

    Args:
        target: ``"package.module:function"``; an async function the worker
            calls with its :class:`Channel` (the other end of
            ``worker.channel``).  It must be importable by the worker's
            interpreter in isolated mode (an installed package).
        sandbox: the :class:`SandboxPolicy`; default
            :meth:`SandboxPolicy.strict` (with a ``zygote``: its
            ``sandbox``).  Running without one needs
            ``SandboxPolicy.none(i_understand_this_is_unsandboxed=True)``.
        zygote: a :class:`Zygote` (:func:`open_zygote`) to fork the worker
            from instead of starting an interpreter; the worker then has the
            zygote's interpreter and environment (``python`` and ``env`` are
            refused).
        file_access: :class:`FileAccess` rules for the file broker; the
            worker opens files with ``await current_broker().open(path)``.
        python: the interpreter (default :data:`sys.executable`).
        env: the worker's environment; default: the parent's variables
            ``PATH``, ``LANG``, ``LC_ALL``, ``LC_CTYPE`` and ``TZ``, nothing
            else.
        cwd: the worker's working directory.
        stdout: where the worker's stdout goes (default ``/dev/null``;
            ``None`` inherits the parent's).
        startup_timeout: seconds to wait for the worker's sandbox report (and
            the longest the worker waits for its go-ahead after sending it).
        grace_period: seconds a normal exit waits for the worker to finish
            before ``SIGTERM`` (and as long again before ``SIGKILL``).
        channel_options: passed to :func:`open_channel` for the main channel.

    Yields:
        The running :class:`Worker`.

    Raises:
        SandboxUnavailableError: a required sandbox layer cannot be applied
            (raised before spawning, or when the worker's report or
            ``/proc`` show it missing; the worker is then killed).
        WorkerError: the worker failed to start, exited with a non-zero
            status, or its report was malformed.
        ValueError: a bad ``target``, a read-write ``file_access`` rule
            with a policy whose ``max_file_size`` is 0 (``strict()``), or
            ``python`` or ``env`` with a ``zygote``.
    """
    _check_target(target)
    if zygote is not None and (python is not None or env is not None):
        raise ValueError(
            "a worker forked from a zygote has the zygote's interpreter and "
            "environment: pass python= and env= to open_zygote()"
        )
    if sandbox is not None:
        policy = sandbox
    else:
        policy = zygote.sandbox if zygote is not None else SandboxPolicy.strict()
    if not isinstance(policy, SandboxPolicy):
        raise TypeError(f"sandbox must be a SandboxPolicy, not {policy!r}")
    policy.check()
    if policy.is_unsandboxed:
        _log.warning(
            "starting worker %s with SandboxPolicy.none(): it runs unsandboxed", target
        )
    rules = sequence_of_rules(file_access)
    broker = FileBroker(rules) if rules else None
    if policy.max_file_size == 0 and any(rule.writable for rule in rules):
        raise ValueError(
            f"a read-write FileAccess rule, but the {policy.name!r} sandbox policy sets "
            "max_file_size=0 (RLIMIT_FSIZE): every write would fail with EFBIG; use "
            "attrs.evolve(policy, max_file_size=None) or a byte limit"
        )

    local, remote = channel_pair()
    endpoints: dict[str, Endpoint] = {CHANNEL_SWITCH: remote}
    broker_local: Endpoint | None = None
    if broker is not None:
        broker_local, broker_remote = channel_pair()
        endpoints[BROKER_SWITCH] = broker_remote
    argv = [
        os.fspath(python) if python is not None else sys.executable,
        "-I",
        "-m",
        "trio_mojo._workers._bootstrap",
        f"--target={target}",
        f"--parent-pid={os.getpid()}",
        f"--sandbox={policy.to_json()}",
        f"--startup-timeout={startup_timeout}",
    ]
    try:
        if zygote is not None:
            process: ProcessLike = await zygote._start_worker(
                target,
                policy,
                endpoints,
                stdout=stdout,
                cwd=cwd,
                startup_timeout=startup_timeout,
            )
        else:
            process = await start_with_endpoints(
                argv,
                endpoints,
                env=_environment(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
    except BaseException:
        local.close()
        if broker_local is not None:
            broker_local.close()
        raise
    try:
        async with (
            owned_child(process) as (nursery, tail),
            open_channel(local, **channel_options) as channel,
        ):
            broker_scope = trio.CancelScope()
            if broker is not None and broker_local is not None:
                nursery.start_soon(_serve_broker, broker, broker_local, broker_scope)
            report, pid = await _handshake(
                channel, process, tail, policy, startup_timeout
            )
            worker = Worker(process, pid, channel, report, tail)
            worker.broker = broker
            try:
                yield worker
                await channel.aclose()
            except (ChannelError, trio.EndOfChannel) as exc:
                error = await _explain(exc, process, tail)
                if error is exc:
                    raise
                raise error from exc
            # The broker serves until the worker has exited: a target may
            # still use it after its channel's EOF.
            await _finish(process, tail, grace_period)
            broker_scope.cancel()
    finally:
        local.close()
        if broker_local is not None:
            broker_local.close()


@asynccontextmanager
async def owned_child(
    process: ProcessLike,
) -> AsyncIterator[tuple[trio.Nursery, _Tail]]:
    """Own a started child for a block: its stderr tail, its helper tasks.

    Yields a nursery for the block's helper tasks (a stderr drain into the
    :class:`_Tail` yielded runs there already); they are cancelled when the
    block ends.  A block that fails (an exception or a cancellation) kills
    the child at once, and its error reaches the caller bare: not in an
    exception group, even when the helper tasks saw an outer cancellation
    too.  Either way the child is killed if it still runs, and its pipes
    are closed.  ``open_worker`` and ``open_zygote`` own their child so.
    """
    tail = _Tail()
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            assert process.stderr is not None
            nursery.start_soon(tail.drain, process.stderr)
            try:
                yield nursery, tail
            except BaseException as exc:
                # Raised outside the nursery, so the caller gets it bare.
                raised = exc
                await kill(process)
            nursery.cancel_scope.cancel()
    except BaseException:
        # The helper tasks saw an outer cancellation too: the nursery raises
        # a group of Cancelled that must not replace the body's own error.
        if raised is None:
            raise
    finally:
        if process.returncode is None:
            await kill(process)
        await close_pipes(process)
    if raised is not None:
        raise raised


async def _handshake(
    channel: Channel,
    process: ProcessLike,
    tail: _Tail,
    policy: SandboxPolicy,
    startup_timeout: float,
) -> tuple[SandboxReport, int]:
    """Receive the report, check it in /proc, send the go-ahead.

    Returns the report and the host pid of the process running the target.
    """
    try:
        with trio.fail_after(startup_timeout):
            payload = await _first_message(channel, process, tail)
    except trio.TooSlowError as exc:
        raise await _worker_error(
            f"sent no sandbox report within {startup_timeout} s", process, tail
        ) from exc
    try:
        report = SandboxReport.from_bytes(payload)
    except ValueError as exc:
        raise await _worker_error(
            "sent a malformed sandbox report", process, tail
        ) from exc
    if report.failed is not None:  # the worker said so: it exits without its target
        raise SandboxUnavailableError(report.failed, report.reason or "failed")
    located = False
    try:
        pid = process.pid
        namespaced = report.layers.get("namespaces") == "applied"
        if namespaced and process.supervises_namespaced_worker:
            pid = worker_pid(process.pid)
            process.forward_signals(pid)
        located = True
        verify_report(pid, policy, report)
    except (SandboxUnavailableError, OSError) as exc:
        # A worker that died meanwhile (killed from outside: its target has
        # not run) leaves /proc entries that are gone or half torn down.
        if await _died(process, located):
            raise await _worker_error(
                "died before its sandbox was verified", process, tail, exc
            ) from exc
        if isinstance(exc, SandboxUnavailableError):
            raise
        raise SandboxUnavailableError(
            "report", f"cannot check the worker in /proc: {exc}"
        ) from exc
    await channel.send(go_ahead(report))
    return report, pid


async def _died(process: ProcessLike, located: bool) -> bool:
    """After a failed check: did the worker die (so it is no sandbox failure)?

    Once the worker is located, its pidfd (or its supervisor) tells at once;
    before, a worker that vanished is known by its supervisor exiting.
    """
    if located and process.poll() is None and not process.forwarded_process_exited():
        return False
    with trio.move_on_after(_EXIT_WAIT):
        await process.wait()
    return process.returncode is not None


async def _finish(process: ProcessLike, tail: _Tail, grace_period: float) -> None:
    """Wait for the worker to exit after its channel closed; check its status."""
    exited = await reap(process, grace_period=grace_period)
    if exited and process.returncode:
        raise await _worker_error("failed", process, tail)


async def _explain(
    exc: BaseException, process: ProcessLike, tail: _Tail
) -> BaseException:
    """The channel broke: a WorkerError if the worker died by itself."""
    with trio.CancelScope(shield=True), trio.move_on_after(0.5):
        await process.wait()
    if process.returncode:
        return await _worker_error("died", process, tail, exc)
    return exc


async def _serve_broker(
    broker: FileBroker, endpoint: Endpoint, scope: trio.CancelScope
) -> None:
    """Run the broker on its own channel; its failure never reaches the parent.

    The channel lives and dies with this task.  Its send queue is small
    (:data:`BROKER_SEND_QUEUE`) and so is its socket's send buffer: a worker
    that sends requests and never reads the replies makes the broker wait
    after a few replies, and stop serving (the worker's requests then fill
    the socket and its sends wait), instead of holding an open file per
    request.  Any failure (a protocol violation, a flood that ends with
    the worker gone and replies unsent) stops the broker: it is kept in
    ``broker.error`` and logged, and the channel is closed with every fd
    it held.  ``scope`` is cancelled once the worker has exited: a clean end.
    """
    try:
        with scope:
            _limit_send_buffer(endpoint)
            async with open_channel(
                endpoint,
                # Requests never carry fds: any fd is malformed.
                max_handles_per_message=0,
                max_queued_handles=0,
                max_message_size=MAX_REQUEST_SIZE,
                send_queue_messages=BROKER_SEND_QUEUE,
                receive_queue_messages=BROKER_SEND_QUEUE,
                flush_timeout=1.0,
            ) as channel:
                await broker.serve(channel)
    except Exception as exc:
        broker.error = exc
        _log.warning("file broker of a worker stopped: %r", exc)


def _limit_send_buffer(endpoint: Endpoint) -> None:
    sock = socket.socket(fileno=endpoint.fileno())
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BROKER_SNDBUF)
    finally:
        sock.detach()
