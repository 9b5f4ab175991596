"""The zygote, parent side: one pre-imported process that forks workers.

Theory of operation
-------------------

Starting a worker the ordinary way costs an interpreter start and its
imports (about 100 ms).  Chromium's answer is a *zygote*: one process that
has already done that work and forks a child per request.
:func:`open_zygote` starts one (``python -I -m
trio_mojo._workers._zygote_main``, with the launch hygiene of a worker: an
environment from the allowlist, stdin ``/dev/null``, a new session, only
its control channel passed, ``PR_SET_PDEATHSIG``), waits until it has
imported Trio, trio_mojo and the ``preload`` modules, and yields a
:class:`Zygote`.  ``open_worker(target, zygote=z)`` then forks the worker
from it; everything after the fork (the sandbox, the report, the parent's
checks in ``/proc``) is what a spawned worker does.

The parent asks over a control channel (``_zygote_protocol``) and passes the
worker's fds with the request: its channel end, its broker channel end, the
write end of its stderr pipe (the parent keeps the read end and the tail,
as for a spawned worker), and its stdout when it is not ``/dev/null``.  The
zygote replies with the worker's pid and a pidfd of it.

The zygote is the worker's parent, so only it can reap the worker; it
reports each exit status over the channel.  A :class:`ForkedProcess` is the
parent's handle: ``pid`` (the real, host pid), ``returncode`` and
``wait()`` (the status the zygote relayed), and signals sent through the
pidfd, so a pid that was reaped and reused is never hit.  One task per
zygote reads the channel and routes each reply to its request or its
process; it never waits on anything else, so replies cannot pile up.

When the zygote dies (or is killed), every pending request fails with
:class:`WorkerError` and the workers it forked die by their parent-death
signal; their handles then report ``-SIGKILL`` once their pidfd says they
are gone (the true status died with the zygote).  Leaving the
:func:`open_zygote` block closes the channel (the zygote exits), reaps the
zygote, and kills any worker of it that is still running.

Bounds: at most ``max_pending`` requests wait for a reply (further callers
wait their turn); each carries at most four fds; control messages are at
most 64 KiB and a reply at most one fd.  A request cancelled while it waits
for its reply is not lost: the worker it forks is killed on arrival.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._core._message import Message
from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._errors import ChannelError, WorkerError
from trio_mojo._handles import Handle, close_all
from trio_mojo._sandbox import SandboxPolicy

from . import _zygote_protocol as protocol
from ._broker import BROKER_SWITCH
from ._spawn import (
    CHANNEL_SWITCH,
    Process,
    SignalForwarding,
    reap,
    start_with_endpoints,
)
from ._worker import _environment, _Tail, owned_child

__all__ = ["ForkedProcess", "Zygote", "open_zygote"]

_log = logging.getLogger("trio_mojo")
_ROLE_OF_SWITCH: Final = {CHANNEL_SWITCH: "channel", BROKER_SWITCH: "broker"}
_MODULE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_DEAD_ZYGOTE_WAIT: Final = 1.0
"""Seconds to wait for a zygote whose channel broke to exit (for its status)."""


class ForkedProcess(SignalForwarding):
    """A worker forked by a :class:`Zygote`: a :class:`Process` work-alike.

    ``pid`` is the worker's real pid; ``returncode`` is ``None`` while it
    runs, then the exit status the zygote relayed (negative: the signal
    that ended it); ``await wait()`` waits for it.  Signals go through a
    pidfd opened by the zygote before the worker could be reaped, so they
    never reach a process that reused the pid.  A root zygote forks the
    worker straight into a PID namespace of its own
    (``supervises_namespaced_worker`` is false): ``pid`` is the worker
    itself.  Otherwise its lockdown makes this process the supervisor of
    the worker proper, and once ``open_worker`` has found that one,
    signals go to it (:meth:`forward_signals`).  ``stderr`` is the read
    end of the worker's stderr pipe, as a Trio stream; ``stdin`` and
    ``stdout`` are always ``None``.
    """

    def __init__(
        self,
        pid: int,
        pidfd: Handle,
        stderr: trio.lowlevel.FdStream,
        target: str,
        *,
        own_pid_namespace: bool,
    ) -> None:
        self.pid: Final = pid
        self.supervises_namespaced_worker: Final = not own_pid_namespace
        self.args: Final = (target,)
        self.stdin: trio.lowlevel.FdStream | None = None
        self.stdout: trio.lowlevel.FdStream | None = None
        self.stderr: trio.lowlevel.FdStream | None = stderr
        self._pidfd: Handle | None = pidfd
        self._returncode: int | None = None
        self._settled = trio.Event()
        self._zygote_lost = False
        self._orphaned = False
        self._wait_lock = trio.Lock()

    @property
    def returncode(self) -> int | None:
        """The exit status, or ``None`` while the worker runs."""
        return self.poll()

    def poll(self) -> int | None:
        """Return :attr:`returncode` without waiting."""
        if self._returncode is None and self._zygote_lost and self._pidfd is not None:
            gone = select.poll()
            gone.register(self._pidfd.fileno(), select.POLLIN)
            if gone.poll(0):
                self._settle(-signal.SIGKILL)
        return self._returncode

    async def wait(self) -> int:
        """Wait until the worker has exited and return its status."""
        async with self._wait_lock:
            if self._returncode is None:
                await self._settled.wait()
            if self._returncode is None and self._pidfd is not None:
                # The zygote died: its parent-death signal kills the worker.
                with contextlib.suppress(trio.ClosedResourceError):
                    await trio.lowlevel.wait_readable(self._pidfd.fileno())
                self._settle(-signal.SIGKILL)
        returncode = self._returncode
        assert returncode is not None
        return returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` through a pidfd, unless the worker was reaped."""
        if self.poll() is None and self._pidfd is not None:
            if self._signal_forwarded(sig):
                return
            # ProcessLookupError: it exited; the zygote's report is on its way.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd.fileno(), sig)

    def terminate(self) -> None:
        """``SIGTERM``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """``SIGKILL``."""
        self.send_signal(signal.SIGKILL)

    def _exited(self, returncode: int) -> None:
        """The zygote reaped the worker."""
        self._settle(returncode)

    def _lose_zygote(self) -> None:
        """The zygote died before it reported this worker's exit."""
        self._zygote_lost = True
        self._settled.set()

    def _settle(self, returncode: int) -> None:
        self._returncode = returncode
        self._stop_forwarding()
        if self._pidfd is not None:
            # RuntimeError: outside Trio, where nothing can be waiting on it.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self._pidfd.fileno())
            self._pidfd.close()
            self._pidfd = None
        self._settled.set()

    def _close_stderr(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def __repr__(self) -> str:
        return f"<trio_mojo.ForkedProcess pid={self.pid} returncode={self._returncode}>"


def _orphan(process: ForkedProcess) -> None:
    """A worker whose request was cancelled: kill it; only its exit is awaited."""
    process._orphaned = True
    process.kill()
    process._close_stderr()


class _Pending:
    """One spawn request waiting for the zygote's reply."""

    def __init__(self, target: str, stderr: trio.lowlevel.FdStream) -> None:
        self.target = target
        self.stderr: trio.lowlevel.FdStream | None = stderr
        self.done = trio.Event()
        self.process: ForkedProcess | None = None
        self.error: WorkerError | None = None
        self.abandoned = False

    def close(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None


class Zygote:
    """A running zygote, yielded by :func:`open_zygote`.

    Pass it to ``open_worker(target, zygote=z)``.  Attributes: ``pid`` (the
    zygote process), ``preloaded`` (the modules it imported), ``sandbox``
    (the policy of its workers when ``open_worker`` names none), ``forked``
    (how many workers it has forked) and ``running_workers``.
    """

    def __init__(
        self,
        process: Process,
        channel: Channel,
        tail: _Tail,
        *,
        preloaded: tuple[str, ...],
        sandbox: SandboxPolicy,
        max_pending: int,
    ) -> None:
        self._process = process
        self._channel = channel
        self._tail = tail
        self.preloaded: Final = preloaded
        self.sandbox: Final = sandbox
        self._slots = trio.Semaphore(max_pending)
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._processes: dict[int, ForkedProcess] = {}
        self._error: WorkerError | None = None
        self.forked = 0
        """How many workers this zygote has forked so far."""

    @property
    def pid(self) -> int:
        """The zygote's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The zygote's exit status once it was reaped, else ``None``."""
        return self._process.returncode

    @property
    def stderr_tail(self) -> str:
        """The last few KiB the zygote itself wrote to its stderr."""
        return self._tail.text()

    @property
    def running_workers(self) -> int:
        """Workers forked by this zygote whose exit it has not reported yet."""
        return len(self._processes)

    def __repr__(self) -> str:
        return f"<trio_mojo.Zygote pid={self.pid} workers={self.running_workers}>"

    async def _start_worker(
        self,
        target: str,
        policy: SandboxPolicy,
        endpoints: Mapping[str, Endpoint],
        *,
        stdout: int | None = subprocess.DEVNULL,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> ForkedProcess:
        """Fork a worker running ``target`` under ``policy``; return its handle.

        ``endpoints`` maps :data:`CHANNEL_SWITCH` (required) and
        :data:`BROKER_SWITCH` to the ends the worker gets; they are closed
        here whatever happens.  ``stdout`` is ``subprocess.DEVNULL``,
        ``None`` (this process's stdout) or an fd; the worker waits at most
        ``startup_timeout`` seconds for its go-ahead.

        Raises:
            WorkerError: the zygote refused the request (it has threads, or
                ``fork`` failed) or is dead.
        """
        handles: list[Handle] = []
        roles: list[str] = []
        read_end: trio.lowlevel.FdStream | None = None
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            for switch, endpoint in endpoints.items():
                roles.append(_ROLE_OF_SWITCH[switch])
                handles.append(Handle(endpoint.detach()))
            read_fd, write_fd = os.pipe()
            read_end = trio.lowlevel.FdStream(read_fd)
            roles.append("stderr")
            handles.append(Handle(write_fd))
            if stdout is not subprocess.DEVNULL:
                roles.append("stdout")
                handles.append(Handle.dup(1 if stdout is None else stdout))
            request = protocol.SpawnRequest(
                id=0,  # numbered once a slot is ours
                target=target,
                sandbox=policy.to_json(),
                fds=tuple(roles),
                cwd=None if cwd is None else os.fspath(cwd),
                startup_timeout=startup_timeout,
            )
            pending = _Pending(target, read_end)
            read_end = None  # the pending request owns it now
            async with self._slots:
                return await self._request(request, handles, pending)
        finally:
            close_all(handles)
            for endpoint in endpoints.values():
                endpoint.close()
            if read_end is not None:
                read_end.close()

    async def _request(
        self, request: protocol.SpawnRequest, handles: list[Handle], pending: _Pending
    ) -> ForkedProcess:
        if self._error is not None:
            pending.close()
            raise self._error
        self._next_id += 1
        request = attrs.evolve(request, id=self._next_id)
        message = Message(protocol.encode(request), tuple(handles))
        handles.clear()  # the message (and then the channel) owns them
        try:
            # Never waits for long: the send queue holds far more than
            # max_pending requests.  Shielded, so that the request is either
            # sent (its reply awaited below) or failed, never half-known.
            with trio.CancelScope(shield=True):
                await self._channel.send(message)
        except BaseException as exc:
            close_all(message.handles)
            pending.close()
            if isinstance(exc, trio.ClosedResourceError | ChannelError):
                raise self._lost_error() from exc
            raise
        self._pending[request.id] = pending
        try:
            await pending.done.wait()
        except BaseException:
            pending.abandoned = True  # _route kills what it forks
            if pending.process is not None:
                _orphan(pending.process)
            raise
        if pending.error is not None:
            raise pending.error
        assert pending.process is not None
        return pending.process

    def _failure(self) -> WorkerError | None:
        """Why this zygote forks nothing any more (``None`` while it runs)."""
        if self._error is None and self._process.returncode is None:
            return None
        return self._lost_error()

    def _lost_error(self) -> WorkerError:
        if self._error is None:
            self._error = WorkerError(
                f"the zygote (pid {self.pid}) is gone",
                stderr_tail=self._tail.text(),
            )
        return self._error

    async def _dispatch(self, scope: trio.CancelScope) -> None:
        """Route every reply of the zygote until its channel ends.

        ``scope`` is cancelled when the :func:`open_zygote` block is left.
        """
        with scope:
            try:
                async for message in self._channel:
                    with message:
                        self._route(message)
                reason = "closed its control channel"
            except trio.ClosedResourceError:
                return  # the block is being left
            except (ChannelError, protocol.ProtocolError) as exc:
                reason = f"broke its control channel: {exc}"
                _log.warning("zygote pid %d %s; killing it", self.pid, reason)
                self._process.kill()  # forks nothing more; its workers die too
            with trio.move_on_after(_DEAD_ZYGOTE_WAIT):
                await self._process.wait()
            await self._tail.settle()
            status = self._process.returncode
            self._lose(
                f"the zygote (pid {self.pid}) {reason}"
                + (f" and exited with status {status}" if status is not None else "")
            )

    def _route(self, message: Message) -> None:
        reply = protocol.parse_reply(message.payload, len(message.handles))
        if isinstance(reply, protocol.Exited):
            process = self._processes.pop(reply.pid, None)
            if process is None:
                raise protocol.ProtocolError(
                    f"exit of pid {reply.pid}, which it never forked"
                )
            process._exited(reply.returncode)
            return
        if isinstance(reply, protocol.Ready | protocol.PreloadFailed):
            raise protocol.ProtocolError(f"a second {type(reply).__name__} message")
        pending = self._pending.pop(reply.id, None)
        if pending is None:
            raise protocol.ProtocolError(
                f"a reply to request {reply.id}, which is not pending"
            )
        if isinstance(reply, protocol.Refused):
            pending.close()
            pending.error = WorkerError(
                f"the zygote (pid {self.pid}) refused to fork {pending.target}: "
                f"{reply.error}"
            )
            pending.done.set()
            return
        stderr = pending.stderr
        assert stderr is not None
        pending.stderr = None
        pidfd = Handle(message.handles[0].detach())
        process = ForkedProcess(
            reply.pid,
            pidfd,
            stderr,
            pending.target,
            own_pid_namespace=reply.own_pid_namespace,
        )
        self._processes[reply.pid] = process
        self.forked += 1
        pending.process = process
        if pending.abandoned:
            _orphan(process)
        pending.done.set()

    def _lose(self, reason: str) -> None:
        """The zygote is gone: fail what waits on it, release what it held."""
        self._error = WorkerError(reason, stderr_tail=self._tail.text())
        for pending in self._pending.values():
            pending.close()
            pending.error = self._error
            pending.done.set()
        self._pending.clear()
        for process in self._processes.values():
            process._lose_zygote()
            if process._orphaned:
                process._settle(-signal.SIGKILL)  # nobody waits for it
        self._processes.clear()

    def _release(self) -> None:
        """Leaving the block: kill any worker still running and free its fds."""
        for pending in self._pending.values():
            pending.close()
        for process in [*self._processes.values()]:
            process.kill()
            process._settle(-signal.SIGKILL)
            process._close_stderr()
        self._processes.clear()


def _module_names(preload: Iterable[str]) -> tuple[str, ...]:
    if isinstance(preload, str):
        raise TypeError("preload must be a list of module names, not a string")
    names = []
    for item in preload:
        name = item.partition(":")[0] if isinstance(item, str) else item
        if not isinstance(name, str) or not _MODULE_NAME.fullmatch(name):
            raise ValueError(f"preload {item!r} is not a dotted module name")
        names.append(name)
    return tuple(dict.fromkeys(names))


async def _ready(
    channel: Channel,
    process: Process,
    tail: _Tail,
    python: str,
    startup_timeout: float,
) -> protocol.Ready:
    """The zygote's first message: ready, or which preload failed."""
    try:
        with trio.fail_after(startup_timeout):
            message = await channel.receive()
    except trio.TooSlowError:
        raise WorkerError(
            f"zygote pid {process.pid} was not ready within {startup_timeout} s",
            stderr_tail=tail.text(),
        ) from None
    except (trio.EndOfChannel, ChannelError) as exc:
        with trio.move_on_after(_DEAD_ZYGOTE_WAIT):
            await process.wait()
        await tail.settle()
        raise WorkerError(
            f"zygote pid {process.pid} exited before it was ready",
            returncode=process.returncode,
            stderr_tail=tail.text(),
        ) from exc
    with message:
        try:
            reply = protocol.parse_reply(message.payload, len(message.handles))
        except protocol.ProtocolError as exc:
            raise WorkerError(f"zygote pid {process.pid}: {exc}") from None
    if isinstance(reply, protocol.PreloadFailed):
        raise WorkerError(
            f"zygote preload {reply.module!r} failed: {reply.error} (the zygote runs "
            f"{python} -I, so the module must be installed in that interpreter's "
            "environment, e.g. with its pip)"
        )
    if not isinstance(reply, protocol.Ready):
        raise WorkerError(f"zygote pid {process.pid} sent {reply!r} first")
    return reply


@asynccontextmanager
async def open_zygote(
    *,
    preload: Iterable[str] = (),
    sandbox: SandboxPolicy | None = None,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
    grace_period: float = 5.0,
    max_pending: int = 64,
) -> AsyncIterator[Zygote]:
    """Start a zygote and yield a :class:`Zygote` that forks workers.

    Workers forked from it (``open_worker(target, zygote=z)``) start in
    milliseconds: the zygote has already started the interpreter and
    imported Trio, trio_mojo and ``preload``.  Each is sandboxed and checked
    exactly like a spawned worker.

    Args:
        preload: modules the zygote imports at start (a ``"module:function"``
            target names its module).  A worker's target that is not
            preloaded is imported in the forked worker, before its sandbox.
        sandbox: the :class:`SandboxPolicy` of its workers when
            ``open_worker`` names none; default :meth:`SandboxPolicy.strict`.
            Checked here, before the zygote starts.
        python: the zygote's interpreter (default :data:`sys.executable`).
        env: the zygote's (and so its workers') environment; default: the
            parent's variables named in ``ENV_ALLOWLIST``.
        startup_timeout: seconds to wait for the zygote to be ready.
        grace_period: seconds a normal exit waits for the zygote to exit
            before ``SIGTERM`` (and as long again before ``SIGKILL``).
        max_pending: spawn requests that may wait for the zygote at once;
            further ones wait for a free slot.

    Raises:
        WorkerError: the zygote did not start, or a preload failed to import
            (one line naming the module and the error).
        SandboxUnavailableError: ``sandbox`` requires a layer this machine
            cannot apply.
        ValueError: a preload is not a module name, or ``max_pending < 1``.
    """
    modules = _module_names(preload)
    policy = SandboxPolicy.strict() if sandbox is None else sandbox
    if not isinstance(policy, SandboxPolicy):
        raise TypeError(f"sandbox must be a SandboxPolicy, not {policy!r}")
    policy.check()
    if max_pending < 1:
        raise ValueError(f"max_pending={max_pending} must be at least 1")
    interpreter = os.fspath(python) if python is not None else sys.executable
    argv = [
        interpreter,
        "-I",
        "-m",
        "trio_mojo._workers._zygote_main",
        f"--parent-pid={os.getpid()}",
        f"--preload={','.join(modules)}",
    ]
    local, remote = channel_pair()
    try:
        process = await start_with_endpoints(
            argv,
            {CHANNEL_SWITCH: remote},
            env=_environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except BaseException:
        local.close()
        raise
    zygote: Zygote | None = None
    try:
        async with owned_child(process) as (nursery, tail):
            async with open_channel(
                local,
                max_message_size=protocol.MAX_CONTROL_MESSAGE,
                max_handles_per_message=1,
                max_queued_handles=1,
            ) as channel:
                ready = await _ready(
                    channel, process, tail, interpreter, startup_timeout
                )
                zygote = Zygote(
                    process,
                    channel,
                    tail,
                    preloaded=ready.preloaded,
                    sandbox=policy,
                    max_pending=max_pending,
                )
                dispatcher = trio.CancelScope()
                nursery.start_soon(zygote._dispatch, dispatcher)
                yield zygote
                dispatcher.cancel()
            # The channel is closed: the zygote sees its end and exits.
            await reap(process, grace_period=grace_period)
    finally:
        if zygote is not None:
            zygote._release()
        local.close()
