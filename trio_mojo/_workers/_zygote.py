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
as for a spawned worker), and its stdout when it is not ``/dev/null`` (the
write end of a pipe whose read end the parent keeps, when the worker's
output is forwarded).  The zygote replies with the worker's pid and a
pidfd of it.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._core._message import Message
from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._errors import ChannelError, WorkerError, WorkerTargetError
from trio_mojo._handles import Handle, close_all
from trio_mojo._sandbox import SandboxPolicy

from . import _zygote_protocol as protocol
from ._broker import BROKER_SWITCH
from ._output import ChildOutput, escape_controls
from ._spawn import (
    CHANNEL_SWITCH,
    Process,
    SignalForwarding,
    reap,
    start_with_endpoints,
)
from ._target import Target, check_importable, target_spec
from ._worker import _environment, _interpreter, owned_child

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
    (``is_worker_supervisor`` is false): ``pid`` is the worker
    itself.  Otherwise its lockdown makes this process the supervisor of
    the worker proper, and once ``open_worker`` has found that one,
    signals go to it (:meth:`forward_signals`).  ``stderr`` is the read
    end of the worker's stderr pipe, as a Trio stream, and so is ``stdout``
    when the worker's stdout is a pipe to this process (else ``None``);
    ``stdin`` is always ``None``.
    """

    def __init__(
        self,
        pid: int,
        pidfd: Handle,
        stderr: trio.lowlevel.FdStream,
        target: str,
        *,
        own_pid_namespace: bool,
        stdout: trio.lowlevel.FdStream | None = None,
    ) -> None:
        self.pid: Final = pid
        self.is_worker_supervisor: Final = not own_pid_namespace
        self.args: Final = (target,)
        self.stdin: trio.lowlevel.FdStream | None = None
        self.stdout: trio.lowlevel.FdStream | None = stdout
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

    def _close_pipes(self) -> None:
        for stream in (self.stderr, self.stdout):
            if stream is not None:
                stream.close()
        self.stderr = self.stdout = None

    def __repr__(self) -> str:
        return f"<trio_mojo.ForkedProcess pid={self.pid} returncode={self._returncode}>"


def _pipe_to_parent(read_ends: list[trio.lowlevel.FdStream]) -> Handle:
    """A pipe: its read end, a Trio stream, is added to ``read_ends``; its
    write end, for the worker, is returned."""
    read_fd, write_fd = os.pipe()
    try:
        read_ends.append(trio.lowlevel.FdStream(read_fd))
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    return Handle(write_fd)


def _orphan(process: ForkedProcess) -> None:
    """A worker whose request was cancelled: kill it; only its exit is awaited."""
    process._orphaned = True
    process.kill()
    process._close_pipes()


class _Pending:
    """One spawn request waiting for the zygote's reply."""

    def __init__(
        self,
        target: str,
        stderr: trio.lowlevel.FdStream,
        stdout: trio.lowlevel.FdStream | None,
    ) -> None:
        self.target = target
        self.pipes: tuple[trio.lowlevel.FdStream, trio.lowlevel.FdStream | None] | None
        self.pipes = (stderr, stdout)
        """The read ends of the worker's stderr and stdout, until it is forked."""
        self.done = trio.Event()
        self.process: ForkedProcess | None = None
        self.error: WorkerError | None = None
        self.abandoned = False

    def close(self) -> None:
        if self.pipes is not None:
            for stream in self.pipes:
                if stream is not None:
                    stream.close()
            self.pipes = None


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
        output: ChildOutput,
        *,
        preloaded: tuple[str, ...],
        sandbox: SandboxPolicy,
        max_pending: int,
        python: str,
        env: Mapping[str, str],
    ) -> None:
        self._process = process
        self._channel = channel
        self._tail = output
        self._python = python
        self._env = env
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
        stdout: int = subprocess.DEVNULL,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> ForkedProcess:
        """Fork a worker running ``target`` under ``policy``; return its handle.

        ``endpoints`` maps :data:`CHANNEL_SWITCH` (required) and
        :data:`BROKER_SWITCH` to the ends the worker gets; they are closed
        here whatever happens.  ``stdout`` is ``subprocess.DEVNULL``,
        ``subprocess.PIPE`` (a pipe to this process: the handle's
        ``stdout``) or an fd (``open_worker`` checked it); the worker waits at
        most ``startup_timeout`` seconds for its go-ahead.

        Raises:
            WorkerError: the zygote refused the request (it has threads, or
                ``fork`` failed) or is dead.
        """
        handles: list[Handle] = []
        roles: list[str] = []
        read_ends: list[trio.lowlevel.FdStream] = []
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            for switch, endpoint in endpoints.items():
                roles.append(_ROLE_OF_SWITCH[switch])
                handles.append(Handle(endpoint.detach()))
            roles.append("stderr")
            handles.append(_pipe_to_parent(read_ends))
            stdout_end = None
            if stdout == subprocess.PIPE:
                roles.append("stdout")
                handles.append(_pipe_to_parent(read_ends))
                stdout_end = read_ends[-1]
            elif stdout != subprocess.DEVNULL:
                roles.append("stdout")
                handles.append(Handle.dup(stdout))
            request = protocol.SpawnRequest(
                id=0,  # numbered once a slot is ours
                target=target,
                sandbox=policy.to_json(),
                fds=tuple(roles),
                cwd=None if cwd is None else os.fspath(cwd),
                startup_timeout=startup_timeout,
            )
            pending = _Pending(target, read_ends[0], stdout_end)
            read_ends.clear()  # the pending request owns them now
            async with self._slots:
                return await self._request(request, handles, pending)
        finally:
            close_all(handles)
            for endpoint in endpoints.values():
                endpoint.close()
            for stream in read_ends:
                stream.close()

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
        # Pending before it is sent: send() may yield after writing, and the
        # reply may be routed before send() returns.
        self._pending[request.id] = pending
        try:
            # Never waits for long: the send queue holds far more than
            # max_pending requests.  Shielded, so that the request is either
            # sent (its reply awaited below) or failed, never half-known.
            with trio.CancelScope(shield=True):
                await self._channel.send(message)
        except BaseException as exc:
            self._pending.pop(request.id, None)
            close_all(message.handles)
            pending.close()
            if isinstance(exc, trio.ClosedResourceError | ChannelError):
                raise self._lost_error() from None
            raise
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
        assert pending.pipes is not None
        stderr, stdout = pending.pipes
        pending.pipes = None
        pidfd = Handle(message.handles[0].detach())
        process = ForkedProcess(
            reply.pid,
            pidfd,
            stderr,
            pending.target,
            own_pid_namespace=reply.own_pid_namespace,
            stdout=stdout,
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
            process._close_pipes()
        self._processes.clear()


def _preload_items(preload: Iterable[str | Target]) -> tuple[str, ...]:
    """Each preload as a module name or a ``module:function`` target."""
    if isinstance(preload, str):
        raise TypeError("preload must be a list of module names, not a string")
    items = []
    for item in preload:
        if isinstance(item, str) and ":" not in item:
            if not _MODULE_NAME.fullmatch(item):
                raise WorkerTargetError(
                    f"zygote preload {item!r} is not a dotted module name", target=item
                )
            items.append(item)
        else:
            items.append(target_spec(item))
    return tuple(dict.fromkeys(items))


async def _ready(
    channel: Channel,
    process: Process,
    output: ChildOutput,
    startup_timeout: float,
) -> protocol.Ready:
    """The zygote's first message: ready, or which preload failed."""
    with trio.move_on_after(startup_timeout) as waited:
        try:
            message = await channel.receive()
        except (trio.EndOfChannel, ChannelError) as exc:
            ended: BaseException | None = exc
        else:
            ended = None
    if waited.cancelled_caught:
        raise WorkerError(
            f"zygote pid {process.pid} was not ready within {startup_timeout} s",
            stderr_tail=output.text(),
        )
    if ended is not None:
        with trio.move_on_after(_DEAD_ZYGOTE_WAIT):
            await process.wait()
        await output.settle()
        error = WorkerError(
            f"zygote pid {process.pid} exited before it was ready",
            returncode=process.returncode,
            stderr_tail=output.text(),
        )
        raise error from (None if isinstance(ended, trio.EndOfChannel) else ended)
    with message:
        try:
            reply = protocol.parse_reply(message.payload, len(message.handles))
        except protocol.ProtocolError as exc:
            raise WorkerError(f"zygote pid {process.pid}: {exc}") from None
    if isinstance(reply, protocol.PreloadFailed):
        with trio.move_on_after(_DEAD_ZYGOTE_WAIT):
            await process.wait()
        await output.settle()
        raise WorkerTargetError(
            escape_controls(reply.error, keep=frozenset()),
            target=reply.module,
            returncode=process.returncode,
            stderr_tail=output.text(),
        )
    if not isinstance(reply, protocol.Ready):
        raise WorkerError(f"zygote pid {process.pid} sent {reply!r} first")
    return reply


@asynccontextmanager
async def open_zygote(
    *,
    preload: Iterable[str | Callable[[Channel], Awaitable[object]]] = (),
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
        preload: what the zygote imports at start: module names, or worker
            targets (``"module:function"`` or function objects, as
            :func:`open_worker` takes them), whose function must then exist
            and be an ``async def``.  Each module must be importable by
            ``python -I``; that is checked before the zygote starts.  A
            worker's target that is not preloaded is imported in the forked
            worker, before its sandbox.
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
        WorkerTargetError: a preload is not a module name or a target, is
            not importable by ``python -I`` (both before the zygote
            starts), or failed in the zygote: its import raised, or a
            target's function is missing or not an ``async def`` (one line
            naming it and the error).
        WorkerError: the zygote did not start.
        SandboxUnavailableError: ``sandbox`` requires a layer this machine
            cannot apply.
        ValueError: ``max_pending < 1``.
    """
    items = _preload_items(preload)
    policy = SandboxPolicy.strict() if sandbox is None else sandbox
    if not isinstance(policy, SandboxPolicy):
        raise TypeError(f"sandbox must be a SandboxPolicy, not {policy!r}")
    policy.check()
    if max_pending < 1:
        raise ValueError(f"max_pending={max_pending} must be at least 1")
    interpreter = _interpreter(python)
    environment = _environment(env)
    for item in items:
        what = "worker target module" if ":" in item else "zygote preload module"
        await check_importable(
            item,
            python=interpreter,
            env=environment,
            startup_timeout=startup_timeout,
            what=what,
        )
    argv = [
        interpreter,
        "-I",
        "-m",
        "trio_mojo._workers._zygote_main",
        f"--parent-pid={os.getpid()}",
        f"--preload={','.join(items)}",
    ]
    local, remote = channel_pair()
    try:
        process = await start_with_endpoints(
            argv,
            {CHANNEL_SWITCH: remote},
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except BaseException:
        local.close()
        raise
    zygote: Zygote | None = None
    # The control channel and the dispatcher run shielded until the block
    # is left, even by a cancellation: the workers killed on the way out
    # (a pool's, say) learn their exit status through them.
    control = trio.CancelScope(shield=True)
    dispatcher = trio.CancelScope(shield=True)
    try:
        output = ChildOutput()
        async with owned_child(process, output) as nursery:
            try:
                channel = await nursery.start(_run_control_channel, local, control)
                ready = await _ready(channel, process, output, startup_timeout)
                zygote = Zygote(
                    process,
                    channel,
                    output,
                    preloaded=ready.preloaded,
                    sandbox=policy,
                    max_pending=max_pending,
                    python=interpreter,
                    env=environment,
                )
                nursery.start_soon(zygote._dispatch, dispatcher)
                yield zygote
                # The zygote sees the end of its channel and exits.
                await channel.aclose()
            finally:
                dispatcher.cancel()
                control.cancel()
            await reap(process, grace_period=grace_period)
    finally:
        if zygote is not None:
            zygote._release()
        local.close()


async def _run_control_channel(
    endpoint: Endpoint,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Channel],
) -> None:
    """Own the zygote's control channel until ``scope`` is cancelled."""
    with scope:
        async with open_channel(
            endpoint,
            max_message_size=protocol.MAX_CONTROL_MESSAGE,
            max_handles_per_message=1,
            max_queued_handles=1,
        ) as channel:
            task_status.started(channel)
            await trio.sleep_forever()
