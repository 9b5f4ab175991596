"""Workers: a Python child process connected by a channel, in one call.

Theory of operation
-------------------

:func:`open_worker` is an async context manager around one child:

1. **Before spawning** it checks the target (``_target``: its form, and
   that the worker's interpreter can import its module in isolated mode;
   :class:`WorkerTargetError`) and the :class:`SandboxPolicy` against what
   can be applied (a required layer that cannot be raises
   :class:`SandboxUnavailableError` here, before any process exists).
2. It starts ``python -I -m trio_mojo._workers._bootstrap`` (isolated mode: no
   ``PYTHON*`` variables, no user site, no current directory on the path)
   with an environment built from an explicit allowlist, stdin from
   ``/dev/null``, a new session, stderr into a pipe whose tail we keep
   (``_output``; with ``forward_output``, stdout into a pipe too, and the
   lines of both written to this process's), and
   the channel's remote end passed as ``--mojo-platform-channel-handle=N``
   (see ``_spawn``).  With ``file_access`` rules a second channel carries
   the file broker (``_broker``).  With ``zygote=z`` the child is forked
   from that zygote instead (``_zygote``), and runs the same bootstrap
   steps from the import of its target on.
3. The child bootstrap (``_bootstrap``) closes every other fd, arms
   ``PR_SET_PDEATHSIG``, imports the target (a target that cannot be
   loaded is reported in place of the report, in one line, and raised as
   :class:`WorkerTargetError`), locks down (with a PID
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

The worker's exit, not only the end of its channel, tells the parent that
it is gone: a task waits for the process (its pidfd, or the status its
zygote relays) and then shuts the parent's end of the channel down, so a
worker that handed the parent a copy of its own end and exited is noticed
all the same (``_end_channel_on_exit``).

A child that dies by itself with a non-zero status, or that fails to
start, surfaces as :class:`WorkerError` with its exit status and the tail of
its stderr (control characters escaped); when the body was leaving because
the channel broke (``DisconnectedError`` and friends), that error is
chained as the cause.  A clean end of channel is not chained (nor shown as
the context): it says nothing the :class:`WorkerError` does not.

The file broker, when there is one, runs in a task of its own that also
owns its channel: a broker failure (a flooding or misbehaving worker) is
kept in ``FileBroker.error`` and never raised from this block.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._errors import (
    ChannelError,
    SandboxUnavailableError,
    WorkerError,
    WorkerTargetError,
)
from trio_mojo._sandbox import SandboxPolicy, SandboxReport
from trio_mojo._sandbox._pidns import worker_pid
from trio_mojo._sandbox._verify import verify_report

from ._broker import (
    BROKER_SWITCH,
    DEFAULT_REQUESTS_PER_SECOND,
    MAX_REQUEST_SIZE,
    FileAccess,
    FileBroker,
    sequence_of_rules,
)
from ._handshake import go_ahead, parse_target_failed
from ._output import ChildOutput
from ._spawn import (
    CHANNEL_SWITCH,
    ProcessLike,
    close_pipes,
    kill,
    reap,
    start_with_endpoints,
)
from ._target import check_importable, target_module, target_spec

if TYPE_CHECKING:
    from ._zygote import Zygote

__all__ = [
    "ENV_ALLOWLIST",
    "Worker",
    "check_stdout",
    "check_target",
    "open_worker",
    "owned_child",
]

ENV_ALLOWLIST: Final = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
"""Variables a worker inherits from the parent when ``env`` is not given."""
_log = logging.getLogger("trio_mojo")
_EXIT_WAIT: Final = 2.0
"""Seconds to wait for the exit status of a worker seen dying."""
BROKER_SEND_QUEUE: Final = 4
"""Replies the broker queues for a worker before it stops serving it."""
WORKER_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024
"""Default ``max_message_size`` of a worker's channel (header included):
a worker can make the parent hold a message this large in memory (while
it arrives, and in the receive queue), not 256 MiB as a plain channel."""
WORKER_CHANNEL_DEFAULTS: Final = {
    "max_message_size": WORKER_MAX_MESSAGE_SIZE,
    "reopen_pipes": True,
}
"""What :func:`open_worker` passes to :func:`open_channel` unless
``channel_options`` says otherwise: a worker is an untrusted peer."""
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
        output: ChildOutput,
    ) -> None:
        self._process = process
        self._pid = pid
        self.channel: Final = channel
        self.sandbox_report: Final = report
        self._output = output
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
        return self._output.text()

    def __repr__(self) -> str:
        return f"<trio_mojo.Worker pid={self.pid} returncode={self.returncode}>"


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {key: os.environ[key] for key in ENV_ALLOWLIST if key in os.environ}
    if extra:
        env.update(extra)
    return env


def _interpreter(python: str | os.PathLike[str] | None) -> str:
    return os.fspath(python) if python is not None else sys.executable


async def check_target(
    spec: str,
    *,
    zygote: Zygote | None,
    python: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    startup_timeout: float,
) -> None:
    """Check, before anything starts, that a worker's interpreter (or its
    zygote's) can import the module of target ``spec`` in isolated mode.

    A module the zygote preloaded is not checked again.

    Raises:
        WorkerTargetError: it cannot (one line: why, and how to fix it).
        WorkerError: the interpreter did not say what it imports.
        OSError: the interpreter cannot be run.
    """
    if zygote is None:
        await check_importable(
            spec,
            python=_interpreter(python),
            env=_environment(env),
            startup_timeout=startup_timeout,
        )
    elif target_module(spec) not in zygote.preloaded:
        await check_importable(
            spec,
            python=zygote._python,
            env=zygote._env,
            startup_timeout=startup_timeout,
        )


_STDOUT_REFUSED: Final = {
    subprocess.PIPE: "nothing would read the pipe, and a worker that fills it "
    "blocks for ever",
    subprocess.STDOUT: "a worker's stderr is a pipe of the parent's, kept as "
    "Worker.stderr_tail",
}
_FIRST_OWN_FD: Final = 3


def check_stdout(stdout: object) -> None:
    """Refuse a ``stdout`` for a worker other than ``DEVNULL`` or an fd >= 3.

    ``None`` (or fd 0, 1, 2) would give the hostile worker this process's
    own stdio, the same open file description: made non-blocking there,
    this process's next ``print`` to a slow pipe raises
    ``BlockingIOError``.

    Raises:
        TypeError: not an int.
        ValueError: anything else refused, with what to do instead.
    """
    if stdout is not None and type(stdout) is not int:
        raise TypeError(f"stdout must be subprocess.DEVNULL or an fd, not {stdout!r}")
    if stdout is not None and (stdout == subprocess.DEVNULL or stdout >= _FIRST_OWN_FD):
        return
    if stdout is None or stdout >= 0:
        why = "it would give the worker this process's own stdio"
    else:
        why = _STDOUT_REFUSED.get(stdout, "it is not an fd")
    raise ValueError(
        f"stdout={stdout!r} is refused: {why}; use forward_output=True to see "
        "the worker's output, or pass subprocess.DEVNULL (the default) or an "
        "fd >= 3 opened for the worker"
    )


_CHANNEL_OPTIONS: Final = frozenset(inspect.signature(open_channel).parameters) - {
    "endpoint"
}
"""The keyword arguments ``open_worker`` passes on to :func:`open_channel`."""
_NOT_CHANNEL_OPTIONS: Final = {
    "stderr": "a worker's stderr is kept as Worker.stderr_tail; use "
    "forward_output=True to see it as it comes",
    "stdin": "a worker's stdin is /dev/null",
}


def check_channel_options(
    options: Mapping[str, object], caller: str = "open_worker"
) -> None:
    """Refuse, before anything is spawned, a keyword ``open_channel`` lacks.

    ``options`` are what ``caller`` passes on to :func:`open_channel`.

    Raises:
        TypeError: an unknown keyword argument, with what to do instead.
    """
    unknown = sorted(set(options) - _CHANNEL_OPTIONS)
    if unknown:
        name = unknown[0]
        why = _NOT_CHANNEL_OPTIONS.get(
            name,
            f"{caller} passes its other keyword arguments to open_channel, "
            f"which takes {', '.join(sorted(_CHANNEL_OPTIONS))}",
        )
        raise TypeError(
            f"{caller}() got an unexpected keyword argument {name!r}: {why}"
        )


def _cause(exc: BaseException) -> BaseException | None:
    """What a WorkerError shows as its cause: a channel failure says
    something; a clean end of channel only that the worker is gone."""
    return None if isinstance(exc, trio.EndOfChannel) else exc


async def _worker_error(
    what: str,
    process: ProcessLike,
    output: ChildOutput,
    cause: BaseException | None = None,
) -> WorkerError:
    if process.returncode is not None:
        await output.settle()
    error = WorkerError(
        f"worker pid {process.forwarded_pid or process.pid} {what}",
        returncode=process.returncode,
        stderr_tail=output.text(),
    )
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error


async def _first_message(
    channel: Channel, process: ProcessLike, output: ChildOutput
) -> bytes:
    try:
        report = await channel.receive()
    except (trio.EndOfChannel, ChannelError) as exc:
        ended = exc
    else:
        report.close()
        return report.payload
    with trio.move_on_after(_EXIT_WAIT):
        await process.wait()
    raise await _worker_error(
        "exited before it was ready", process, output, _cause(ended)
    )


@asynccontextmanager
async def open_worker(
    target: str | Callable[[Channel], Awaitable[object]],
    *,
    sandbox: SandboxPolicy | None = None,
    zygote: Zygote | None = None,
    file_access: Sequence[FileAccess] | FileAccess = (),
    file_requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
    python: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: int = subprocess.DEVNULL,
    forward_output: bool = False,
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
        target: the async function the worker calls with its
            :class:`Channel` (the other end of ``worker.channel``), as
            ``"package.module:function"`` or as the function object itself,
            if a worker can import it by that name (defined at the top
            level of a module: no lambda, closure, method or function of
            ``__main__``).  Its module must be importable by the worker's
            interpreter in isolated mode (an installed package); that is
            checked before anything starts, without importing it here.
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
        file_requests_per_second: the most file requests the broker serves
            this worker a second (default 200; a worker that asks faster
            waits its turn).
        python: the interpreter (default :data:`sys.executable`).  It runs
            ``python -I -m trio_mojo._workers._bootstrap ...`` and, once
            per interpreter, ``python -I <trio_mojo>/_workers/_importable.py
            MODULE`` to say what it can import.
        env: the worker's environment; default: the parent's variables
            ``PATH``, ``LANG``, ``LC_ALL``, ``LC_CTYPE`` and ``TZ``, nothing
            else.
        cwd: the worker's working directory.
        stdout: where the worker's stdout goes: ``subprocess.DEVNULL``
            (default) or an fd >= 3 opened for it.  The worker shares that
            fd's open file description, and so can change its flags
            (``O_NONBLOCK``, ``O_APPEND``) for every holder: give it one
            that nothing else writes.  To see its output, use
            ``forward_output``.
        forward_output: write each line of the worker's stderr and stdout
            to this process's :data:`sys.stderr` and :data:`sys.stdout` as
            it comes, as ``[worker PID] text``: control characters escaped,
            lines longer than 4096 bytes cut.  The stderr tail is kept as
            well; ``stdout`` must be left at its default.
        startup_timeout: seconds to wait for the worker's sandbox report (and
            the longest the worker waits for its go-ahead after sending it).
        grace_period: seconds a normal exit waits for the worker to finish
            before ``SIGTERM`` (and as long again before ``SIGKILL``).
        channel_options: passed to :func:`open_channel` for the main
            channel, over the defaults of a worker's channel:
            ``max_message_size`` 16 MiB (raise it to exchange larger
            messages) and ``reopen_pipes=True`` (each pipe or FIFO the
            worker sends gets an open file description of its own).

    Yields:
        The running :class:`Worker`.

    Raises:
        WorkerTargetError: the target cannot run (one line that says why
            and what to do): a malformed string, a function object a worker
            cannot import by name or that is not an ``async def``, a module
            the worker's interpreter cannot import (all raised before
            anything starts); or, reported by the worker, a module that
            raised on import, a function it does not have, or one that is
            not an ``async def``.
        SandboxUnavailableError: a required sandbox layer cannot be applied
            (raised before spawning, or when the worker's report or
            ``/proc`` show it missing; the worker is then killed).
        WorkerError: the worker failed to start, exited with a non-zero
            status, or its report was malformed.
        ValueError: ``file_requests_per_second`` is not positive, a
            read-write ``file_access`` rule with a policy whose
            ``max_file_size`` is 0 (``strict()``), ``python`` or ``env``
            with a ``zygote``, ``stdout`` with ``forward_output``, or a
            ``stdout`` that is not ``subprocess.DEVNULL`` or an fd >= 3
            (``None``, ``subprocess.PIPE``, ``subprocess.STDOUT``, this
            process's stdio).
        TypeError: ``stdout`` is not an int, or a keyword argument that
            :func:`open_channel` does not take (``stderr=``, for one), before
            anything is spawned.
    """
    spec = target_spec(target)
    if zygote is not None and (python is not None or env is not None):
        raise ValueError(
            "a worker forked from a zygote has the zygote's interpreter and "
            "environment: pass python= and env= to open_zygote()"
        )
    if forward_output and stdout != subprocess.DEVNULL:
        raise ValueError(
            "forward_output=True forwards the worker's stdout: leave stdout= unset"
        )
    check_stdout(stdout)
    check_channel_options(channel_options)
    if sandbox is not None:
        policy = sandbox
    else:
        policy = zygote.sandbox if zygote is not None else SandboxPolicy.strict()
    if not isinstance(policy, SandboxPolicy):
        raise TypeError(f"sandbox must be a SandboxPolicy, not {policy!r}")
    policy.check()
    if policy.is_unsandboxed:
        _log.warning(
            "starting worker %s with SandboxPolicy.none(): it runs unsandboxed", spec
        )
    rules = sequence_of_rules(file_access)
    if not file_requests_per_second > 0:
        raise ValueError(
            f"file_requests_per_second={file_requests_per_second!r} must be > 0"
        )
    broker = (
        FileBroker(rules, requests_per_second=file_requests_per_second)
        if rules
        else None
    )
    if policy.max_file_size == 0 and any(rule.writable for rule in rules):
        raise ValueError(
            f"a read-write FileAccess rule, but the {policy.name!r} sandbox policy sets "
            "max_file_size=0 (RLIMIT_FSIZE): every write would fail with EFBIG; use "
            "attrs.evolve(policy, max_file_size=None) or a byte limit"
        )
    await check_target(
        spec, zygote=zygote, python=python, env=env, startup_timeout=startup_timeout
    )
    child_stdout = subprocess.PIPE if forward_output else stdout

    local, remote = channel_pair()
    endpoints: dict[str, Endpoint] = {CHANNEL_SWITCH: remote}
    broker_local: Endpoint | None = None
    if broker is not None:
        broker_local, broker_remote = channel_pair()
        endpoints[BROKER_SWITCH] = broker_remote
    argv = [
        _interpreter(python),
        "-I",
        "-m",
        "trio_mojo._workers._bootstrap",
        f"--target={spec}",
        f"--parent-pid={os.getpid()}",
        f"--sandbox={policy.to_json()}",
        f"--startup-timeout={startup_timeout}",
    ]
    try:
        if zygote is not None:
            process: ProcessLike = await zygote._start_worker(
                spec,
                policy,
                endpoints,
                stdout=child_stdout,
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
                stdout=child_stdout,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
    except BaseException:
        local.close()
        if broker_local is not None:
            broker_local.close()
        raise
    output = ChildOutput(forward=forward_output)
    try:
        async with (
            owned_child(process, output) as nursery,
            open_channel(
                local, **{**WORKER_CHANNEL_DEFAULTS, **channel_options}
            ) as channel,
        ):
            nursery.start_soon(_end_channel_on_exit, process, channel)
            broker_scope = trio.CancelScope()
            if broker is not None and broker_local is not None:
                nursery.start_soon(_serve_broker, broker, broker_local, broker_scope)
            report, pid = await _handshake(
                channel, process, output, spec, policy, startup_timeout
            )
            output.pid = pid
            worker = Worker(process, pid, channel, report, output)
            worker.broker = broker
            try:
                yield worker
                await channel.aclose()
            except (ChannelError, trio.EndOfChannel) as exc:
                error = await _explain(exc, process, output)
                if error is exc:
                    raise
                raise error from error.__cause__
            # The broker serves until the worker has exited: a target may
            # still use it after its channel's EOF.
            await _finish(process, output, grace_period)
            broker_scope.cancel()
            if forward_output:
                await output.settle()  # its last lines, before the block ends
    finally:
        local.close()
        if broker_local is not None:
            broker_local.close()


@asynccontextmanager
async def owned_child(
    process: ProcessLike, output: ChildOutput
) -> AsyncIterator[trio.Nursery]:
    """Own a started child for a block: its output, its helper tasks.

    Yields a nursery for the block's helper tasks; ``output`` reads the
    child's pipes there already (:meth:`ChildOutput.start`).  They are
    cancelled when the block ends.  A block that fails (an exception or a
    cancellation) kills the child at once, and its error reaches the
    caller bare: not in an exception group, even when the helper tasks saw
    an outer cancellation too.  Either way the child is killed if it still
    runs, and its pipes are closed.  ``open_worker`` and ``open_zygote`` own
    their child so.
    """
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            output.start(nursery, process)
            try:
                yield nursery
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
    output: ChildOutput,
    spec: str,
    policy: SandboxPolicy,
    startup_timeout: float,
) -> tuple[SandboxReport, int]:
    """Receive the report, check it in /proc, send the go-ahead.

    Returns the report and the host pid of the process running the target.
    """
    with trio.move_on_after(startup_timeout) as waited:
        payload = await _first_message(channel, process, output)
    if waited.cancelled_caught:
        raise await _worker_error(
            f"sent no sandbox report within {startup_timeout} s", process, output
        )
    try:
        failure = parse_target_failed(payload, spec)
        report = None if failure is not None else SandboxReport.from_bytes(payload)
    except ValueError:
        raise await _worker_error(
            "sent a malformed sandbox report", process, output
        ) from None
    if failure is not None:
        with trio.move_on_after(_EXIT_WAIT):
            await process.wait()
        await output.settle()
        raise WorkerTargetError(
            failure,
            target=spec,
            returncode=process.returncode,
            stderr_tail=output.text(),
        )
    assert report is not None
    if report.failed is not None:  # the worker said so: it exits without its target
        raise SandboxUnavailableError(report.failed, report.reason or "failed")
    located = False
    try:
        pid = process.pid
        if process.is_worker_supervisor:  # in a PID namespace, or reaped
            pid = worker_pid(process.pid)
            process.forward_signals(pid)
        located = True
        verify_report(pid, policy, report, identity_pid=process.pid)
    except (SandboxUnavailableError, OSError) as exc:
        # A worker that died meanwhile (killed from outside: its target has
        # not run) leaves /proc entries that are gone or half torn down.
        if await _died(process, located):
            raise await _worker_error(
                "died before its sandbox was verified", process, output, exc
            ) from exc
        if isinstance(exc, SandboxUnavailableError):
            raise
        raise SandboxUnavailableError(
            "report", f"cannot check the worker in /proc: {exc}"
        ) from exc
    await channel.send(go_ahead(report))
    return report, pid


async def _end_channel_on_exit(process: ProcessLike, channel: Channel) -> None:
    """End ``channel`` for this process once the worker has exited.

    The end of the channel is how the parent learns that a worker died,
    but only if nothing else holds the worker's end of the socket: a
    worker can hand this process a copy of it, then exit.  So the worker's
    exit (its pidfd, or the status its zygote relays) shuts the socket
    down both ways: what the worker wrote before it exited is still
    received, then ``EndOfChannel``; a send fails as to a vanished peer.
    """
    await process.wait()
    sock = channel._sock
    if sock.fileno() >= 0:  # else the channel is closed: nothing to end
        with contextlib.suppress(OSError):  # not connected any more
            sock.shutdown(socket.SHUT_RDWR)


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


async def _finish(
    process: ProcessLike, output: ChildOutput, grace_period: float
) -> None:
    """Wait for the worker to exit after its channel closed; check its status."""
    exited = await reap(process, grace_period=grace_period)
    if exited and process.returncode:
        raise await _worker_error("failed", process, output)


async def _explain(
    exc: BaseException, process: ProcessLike, output: ChildOutput
) -> BaseException:
    """The channel broke: a WorkerError if the worker died by itself."""
    with trio.CancelScope(shield=True), trio.move_on_after(0.5):
        await process.wait()
    if process.returncode:
        return await _worker_error("died", process, output, _cause(exc))
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


_WORKER_OPTIONS: Final = frozenset(inspect.signature(open_worker).parameters) - {
    "target",
    "channel_options",
}


def check_worker_options(options: Mapping[str, object], caller: str) -> None:
    """:func:`check_channel_options` for ``caller``, which passes ``options``
    on to :func:`open_worker` (and so the rest on to :func:`open_channel`).

    Raises:
        TypeError: a keyword argument neither takes.
    """
    check_channel_options(
        {name: value for name, value in options.items() if name not in _WORKER_OPTIONS},
        caller,
    )
