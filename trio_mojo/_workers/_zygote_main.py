"""The zygote's entry point: ``python -I -m trio_mojo._workers._zygote_main ...``.

Theory of operation
-------------------

:func:`~trio_mojo.open_zygote` starts this module with::

    --parent-pid=P --preload=pkg.a,pkg.b:func --mojo-platform-channel-handle=N

The zygote closes every fd but 0, 1, 2 and its control channel, arms
``PR_SET_PDEATHSIG`` against the parent, imports Trio, trio_mojo and the
preloads (a preload ``module:function`` is a worker target: the function
must exist and be an ``async def``, ``_target.load_target``; a preload that
fails is reported in one line, ``preload_failed``, and the zygote exits),
prepares what every worker would otherwise build for itself
(the seccomp program: ``_sandbox._apply.prepare``), freezes its objects
for the collector (``gc.freeze()``), says ``ready``, and from then on only
forks workers when the parent asks (``_zygote_protocol``).  Starting a
worker costs a ``fork`` instead of an interpreter start and its imports.

The zygote never forks from inside ``trio.run``: a process forked from
inside a run cannot start a run of its own.  (It runs Trio a few times at
start, each to completion, so that workers inherit warmed-up code:
:func:`_warm_up`.)
It serves the control channel with a small blocking loop instead: ``poll``
on the channel and on a wakeup pipe that the ``SIGCHLD`` handler writes to
(:func:`signal.set_wakeup_fd`), the sans-I/O :class:`MessageDecoder` and
:func:`encode_message` for the framing, and ``_fdpass`` for
``recvmsg``/``sendmsg`` with ``SCM_RIGHTS``.  The requests of one read
are forked back to back, up to :data:`_BATCH`, before their replies go
out (:meth:`_Zygote._handle`).  On ``SIGCHLD`` it reaps with
``waitpid(-1, WNOHANG)`` and reports each exit status; the parent's end of
the channel closing (the parent is done, or dead) ends the zygote, and
its ``PR_SET_PDEATHSIG`` kills every worker it forked.  It stays
single-threaded: before forking it counts ``/proc/self/task`` and refuses
the requests if a preload started a thread (a fork copies only the forking
thread; locks other threads held stay locked in the child).

The process tree.  When the zygote may create PID namespaces (a root
zygote: ``_sandbox._pidns.NamespaceForker``), it forks each worker whose
policy has the namespaces layer straight into a new PID namespace, as pid
2, after forking that namespace's init (pid 1): the zygote is then the
worker's parent, reaps it and reports its own exit status once the init
was reaped too (the namespace is empty), and the worker's lockdown makes
the other namespaces only.  Otherwise the worker's lockdown makes the PID
namespace itself, and the process the zygote forked becomes the worker's
supervisor, as a spawned worker's bootstrap does; the parent is told which
(``Spawned.own_pid_namespace``).

The forked child (:func:`_become_worker`) never returns into this loop.
It resets the signal handling it inherited, arms ``PR_SET_PDEATHSIG``
against the zygote (exiting if the zygote is already gone; from inside its
own PID namespace it cannot tell, and relies on its init, which can),
starts a new session, puts its fds where a worker's go (0 ``/dev/null``,
1 stdout or ``/dev/null``, 2 its stderr pipe, 3 its channel, 4 its broker
channel) and closes every other one, the zygote's control socket
included, so a worker shares nothing with the zygote.  Then it runs
exactly what a spawned worker's bootstrap runs: it imports the target (a
no-op when preloaded; one that cannot be loaded is reported to the parent
on the worker's channel, as the bootstrap reports it) and calls the
bootstrap's ``lock_down_and_run``,
which applies the whole sandbox (the namespaces are created here, in the
child), sends the report, waits for the parent's go-ahead and calls the
target.  It leaves with ``os._exit``, never back into the zygote's loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Final, NoReturn

import trio

from trio_mojo import _fdpass
from trio_mojo._channel import open_channel
from trio_mojo._core._decoder import MessageDecoder
from trio_mojo._core._message import Message
from trio_mojo._core._wire import encode_message
from trio_mojo._endpoint import Endpoint, channel_pair
from trio_mojo._handles import Handle
from trio_mojo._sandbox import Requirement, SandboxPolicy
from trio_mojo._sandbox._apply import (
    close_other_fds,
    prepare,
    set_parent_death_signal,
)
from trio_mojo._sandbox._pidns import Identity, NamespaceForker

from . import _zygote_protocol as protocol
from ._bootstrap import _fd_of, _option, lock_down_and_run, report_target_failure
from ._spawn import CHANNEL_SWITCH, recover_endpoint
from ._target import (
    TargetLoadError,
    import_target_module,
    load_target,
    print_import_traceback,
)

__all__ = ["WORKER_FDS", "main"]

WORKER_FDS: Final = {"stdout": 1, "stderr": 2, "channel": 3, "broker": 4}
"""Where each fd of a spawn request goes in the forked worker."""
_ABOVE_WORKER_FDS: Final = 5
_READ_SIZE: Final = 64 * 1024
_WARM_UP_RUNS: Final = 8
"""Runs of the warm-up: as many as Python 3.11 counts before specialising."""
_WARM_UP_TIMEOUT: Final = 10.0
_BATCH: Final = 4
"""Requests forked back to back before the replies go out (see ``_handle``)."""
_MAX_ERROR: Final = 1000
"""Longest error text the zygote sends (a traceback line, not a traceback)."""

_USAGE: Final = (
    "usage: python -I -m trio_mojo._workers._zygote_main --parent-pid=P "
    "[--preload=MOD[:FUNC],...] --mojo-platform-channel-handle=N\n"
    "This is trio_mojo's zygote; start it with trio_mojo.open_zygote()."
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:_MAX_ERROR]


def _on_sigchld(signum: int, frame: object) -> None:
    """Nothing to do here: the wakeup fd tells the loop to reap."""


class _Zygote:
    """The blocking control loop: requests in, forks, replies and exits out."""

    def __init__(self, sock: socket.socket, forker: NamespaceForker | None) -> None:
        self._sock = sock
        self._forker = forker
        self._announced: set[int] = set()
        """Workers the parent was told about (only their exits are reported)."""
        self._init_of: dict[int, int] = {}
        """Worker -> the init of its PID namespace, until that init is reaped."""
        self._worker_of: dict[int, int] = {}
        self._held: dict[int, int] = {}
        """Exit statuses of workers reaped before their init."""
        self._decoder = MessageDecoder(
            max_message_size=protocol.MAX_CONTROL_MESSAGE,
            max_handles_per_message=protocol.MAX_SPAWN_FDS,
            max_queued_handles=protocol.MAX_SPAWN_FDS,
        )
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def send(self, reply: protocol.Reply, fds: Sequence[int] = ()) -> None:
        """Send one reply, blocking until the kernel took all of it."""
        data = memoryview(encode_message(protocol.encode(reply), num_handles=len(fds)))
        pending = list(fds)
        delay = _fdpass.IN_FLIGHT_DELAYS[0]
        while data:
            sent = _fdpass.send(self._sock, [data], pending)
            if sent is None:
                select.select([], [self._sock], [])
                continue
            if sent == _fdpass.FDS_IN_FLIGHT:
                # Too many of this user's fds in flight (a parent without
                # CAP_SYS_RESOURCE that has not read its pidfds yet):
                # nothing was sent; the count falls as the parent reads.
                time.sleep(delay)
                delay = min(2 * delay, _fdpass.IN_FLIGHT_DELAYS[1])
                continue
            pending = []  # the fds went with the first bytes
            data = data[sent:]

    def serve(self) -> int:
        """Serve until the parent closes its end; returns the exit status."""
        # Only now: the warm-up's trio.run must not find a wakeup fd set.
        signal.signal(signal.SIGCHLD, _on_sigchld)
        signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_read:
                    self._reap()
                elif not self._receive():
                    return 0

    def _receive(self) -> bool:
        """Read once and handle every complete request; False at end of stream."""
        received = _fdpass.receive(self._sock, _READ_SIZE)
        if received is None:
            return True
        data, handles = received
        self._decoder.receive_handles(handles)
        if not data:
            return False
        self._decoder.receive_data(data)
        messages = []
        while isinstance(message := self._decoder.next_message(), Message):
            messages.append(message)
            if len(messages) == _BATCH:
                self._handle(messages)
                messages = []
        self._handle(messages)
        return True

    def _handle(self, messages: Sequence[Message]) -> None:
        """Fork a worker for each request, back to back, then reply to each.

        After a fork, every page this process writes is copied (its workers
        share them): forking a batch with nothing else in between, and
        replying afterwards, copies those pages once per batch rather than
        once per worker.
        """
        try:
            requests = [
                protocol.parse_request(message.payload, len(message.handles))
                for message in messages
            ]
        except ValueError:
            for message in messages:
                message.close()
            raise  # a parent that breaks the protocol is a bug: stop loudly
        threads = len(os.listdir("/proc/self/task"))
        outcomes = []
        for request, message in zip(requests, messages, strict=True):
            with message:
                outcomes.append(self._spawn(request, message.handles, threads))
        for reply, pidfd in outcomes:
            try:
                self.send(reply, [] if pidfd is None else [pidfd])
            finally:
                if pidfd is not None:
                    os.close(pidfd)

    def _spawn(
        self, request: protocol.SpawnRequest, handles: Sequence[Handle], threads: int
    ) -> tuple[protocol.Reply, int | None]:
        """Fork the worker of ``request``: the reply, and the pidfd it carries."""
        if threads != 1:
            refusal = OSError(
                f"the zygote has {threads} threads (a preloaded module started "
                "one); it forks only while single-threaded"
            )
            return protocol.Refused(id=request.id, error=_describe(refusal)), None
        try:
            policy = SandboxPolicy.from_json(request.sandbox)
            fds = dict(zip(request.fds, handles, strict=True))
            pid, own_namespace = self._fork(request, policy, fds)
        except (OSError, ValueError, TypeError) as exc:
            return protocol.Refused(id=request.id, error=_describe(exc)), None
        try:
            pidfd = os.pidfd_open(pid)  # unreaped until _reap(): names this child
        except OSError as exc:
            self._kill(pid)
            return protocol.Refused(id=request.id, error=_describe(exc)), None
        self._announced.add(pid)
        spawned = protocol.Spawned(
            id=request.id, pid=pid, own_pid_namespace=own_namespace
        )
        return spawned, pidfd

    def _fork(
        self,
        request: protocol.SpawnRequest,
        policy: SandboxPolicy,
        fds: Mapping[str, Handle],
    ) -> tuple[int, bool]:
        """Fork the worker; its pid, and whether it has a PID namespace already."""
        zygote = os.getpid()
        namespaced = policy.level("namespaces") is not Requirement.OFF
        forker = self._forker if namespaced else None
        if forker is not None:
            init, pid = forker.fork(_init_identity(policy))
        else:
            init, pid = 0, os.fork()
        own_namespace = forker is not None
        if pid == 0:
            self._sock.detach()  # the child closes the fd; the object must not
            _become_worker(
                request,
                policy,
                {role: h.detach() for role, h in fds.items()},
                # Forked into its namespace, its parent is outside: 0 to it.
                parent=0 if own_namespace else zygote,
                own_pid_namespace=own_namespace,
            )
        if init:
            self._init_of[pid] = init
            self._worker_of[init] = pid
        return pid, own_namespace

    def _kill(self, worker: int) -> None:
        """SIGKILL a worker not announced yet, and its init (both unreaped)."""
        os.kill(worker, signal.SIGKILL)
        if worker in self._init_of:
            os.kill(self._init_of[worker], signal.SIGKILL)

    def _reap(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reaped(pid, os.waitstatus_to_exitcode(status))

    def _reaped(self, pid: int, returncode: int) -> None:
        """Report a worker's exit once it and its PID namespace are gone."""
        init = self._init_of.get(pid)
        if init is not None:  # a worker whose init still holds its namespace
            self._held[pid] = returncode
            os.kill(init, signal.SIGKILL)  # unreaped: still our child
            return
        worker = self._worker_of.pop(pid, None)
        if worker is not None:  # an init: its namespace is empty now
            del self._init_of[worker]
            if worker not in self._held:
                # Not reaped yet (the kernel makes an init's exit wait for
                # that, so this does not happen): reported when it is.
                return
            pid, returncode = worker, self._held.pop(worker)
        if pid in self._announced:
            self._announced.remove(pid)
            self.send(protocol.Exited(pid=pid, returncode=returncode))


def _init_identity(policy: SandboxPolicy) -> Identity | None:
    """The ids a worker's init drops to, from its host pid, under a root zygote."""
    if os.geteuid() != 0 or policy.level("credentials") is Requirement.OFF:
        return None
    return policy.worker_ids


def _install_fds(fds: Mapping[str, int]) -> None:
    """Put each fd at its place in :data:`WORKER_FDS`; close every other fd >= 3."""
    # First move them all above the targets, so that no dup2 overwrites one.
    moved = {
        role: fcntl.fcntl(fd, fcntl.F_DUPFD, _ABOVE_WORKER_FDS)
        for role, fd in fds.items()
    }
    for role, fd in moved.items():
        os.dup2(fd, WORKER_FDS[role], inheritable=False)
    close_other_fds({WORKER_FDS[role] for role in fds})


def _become_worker(
    request: protocol.SpawnRequest,
    policy: SandboxPolicy,
    fds: Mapping[str, int],
    *,
    parent: int,
    own_pid_namespace: bool,
) -> NoReturn:
    """The forked child: become a worker, exactly as the bootstrap does.

    ``parent`` is the zygote's pid as this process sees it (0 from inside
    a PID namespace the zygote forked it into: then the namespace's init
    checks that the zygote lives, and the namespace dies with it).
    """
    status = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        set_parent_death_signal(parent)
        os.setsid()
        _install_fds(fds)
        if request.cwd is not None:
            os.chdir(request.cwd)
        channel = Endpoint.from_fd(WORKER_FDS["channel"])
        try:
            target = load_target(request.target)
        except TargetLoadError as error:
            status = report_target_failure(
                channel, request.target, error, request.startup_timeout
            )
        else:
            broker = Endpoint.from_fd(WORKER_FDS["broker"]) if "broker" in fds else None
            status = lock_down_and_run(
                target,
                policy,
                channel,
                broker,
                request.startup_timeout,
                own_pid_namespace=own_pid_namespace,
            )
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)  # never back into the zygote's loop


async def _exchange_one_message() -> None:
    left, right = channel_pair()
    async with open_channel(left) as sender, open_channel(right) as receiver:
        await sender.send(Message(b"warm-up"))
        with trio.move_on_after(_WARM_UP_TIMEOUT):  # as the go-ahead's wait
            message = await receiver.receive()
            message.close()


def _warm_up() -> None:
    """Run here, :data:`_WARM_UP_RUNS` times, what every worker runs first:
    ``trio.run``, two channels, a message each way.

    A forked worker inherits this interpreter's state, so code that already
    ran here has its lazy imports done and, after enough runs, its bytecode
    specialised: Python 3.11 counts a function's first eight runs in its
    code object before it specialises it, and each count is a write, which
    copies the page in a forked child.  Measured in forked children: a
    quarter of a millisecond and about 50 copy-on-write faults less from
    ``trio.run`` to a message received, against one run.  The runs are
    over before the first fork and leave no thread behind (checked before
    each fork), so no worker is ever forked from inside a run.
    """
    for _ in range(_WARM_UP_RUNS):
        trio.run(_exchange_one_message)


def _namespace_forker() -> NamespaceForker | None:
    """Fork workers straight into PID namespaces, when this process may."""
    try:
        return NamespaceForker()
    except OSError:
        return None  # each worker's lockdown makes its own, with a supervisor


def _preload(items: Sequence[str]) -> protocol.PreloadFailed | None:
    """Import each module, or target (``module:function``, checked too)."""
    for item in items:
        try:
            if ":" in item:
                load_target(item, where="the zygote")
            else:
                import_target_module(item, where="the zygote")
        except TargetLoadError as error:
            print_import_traceback(error)
            return protocol.PreloadFailed(module=item, error=str(error)[:_MAX_ERROR])
    return None


def main(argv: Sequence[str]) -> int:
    """Run the zygote; returns its exit status."""
    parent = _option(argv, "parent-pid")
    preload = _option(argv, "preload") or ""
    channel_fd = _fd_of(argv, CHANNEL_SWITCH)
    if parent is None or not parent.isdigit() or channel_fd is None:
        print(_USAGE, file=sys.stderr)
        return 2
    close_other_fds({channel_fd})
    set_parent_death_signal(int(parent))
    sock = socket.socket(fileno=recover_endpoint(argv).detach())
    zygote = _Zygote(sock, _namespace_forker())
    items = [item for item in preload.split(",") if item]
    failed = _preload(items)
    if failed is not None:
        zygote.send(failed)
        return 1
    modules = list(dict.fromkeys(item.partition(":")[0] for item in items))
    _warm_up()
    prepare()  # the seccomp program every worker loads
    # Objects that exist now are never freed: keep the collector away from
    # them, so that forked workers do not copy their pages just to scan them.
    gc.freeze()
    zygote.send(protocol.Ready(pid=os.getpid(), preloaded=tuple(modules)))
    return zygote.serve()


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.exit(status)
