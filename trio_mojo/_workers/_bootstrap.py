"""The worker's entry point: ``python -I -m trio_mojo._workers._bootstrap ...``.

Theory of operation
-------------------

:func:`open_worker` starts this module with::

    --target=package.module:function --parent-pid=P --sandbox=<policy JSON>
    [--startup-timeout=S] --mojo-platform-channel-handle=N
    [--trio-mojo-broker-handle=M]

and it does, in this order (each step needs the ones before it):

1. close every fd except 0, 1, 2 and the channel(s) (defence in depth: the
   launcher should already have done so; the target's import-time code
   sees nothing else either);
2. ``PR_SET_PDEATHSIG(SIGKILL)``, then exit if the parent is already gone;
3. adopt the channel fds (validated, close-on-exec);
4. import the target, *before* the sandbox (imports need the file system),
   and check that it is an async function (``_target.load_target``).  If
   it cannot be loaded, send the parent that reason, one line, in place of
   the report (:func:`report_target_failure`) and exit with
   :data:`~trio_mojo._workers._handshake.TARGET_FAILED_EXIT`;
   otherwise, in :func:`lock_down_and_run`, lock down
   (``_sandbox._apply.lock_down``: every layer of the policy, in order;
   with a PID namespace this process becomes the worker's supervisor and
   the rest runs in the worker process proper);
5. under ``trio.run``: open the channel, send the sandbox report as the
   first message; if a required layer failed, exit with
   :data:`~trio_mojo._workers._handshake.SANDBOX_FAILED_EXIT`; otherwise
   wait for the parent's go-ahead (``_handshake``; at most ``S`` seconds)
   and only then call ``await target(channel)``.

Steps 4 and 5 are :func:`lock_down_and_run`, which a child forked from a
pre-imported process (a zygote) calls the same way.  The exit status is 0
when the target returns, 1 (with a traceback on
stderr, which the parent keeps) when it raises,
:data:`~trio_mojo._workers._handshake.NO_GO_AHEAD_EXIT` when no go-ahead came,
and :data:`~trio_mojo._workers._handshake.TARGET_FAILED_EXIT` when the
target could not be loaded.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Final

import trio

from trio_mojo._channel import open_channel
from trio_mojo._core._message import Message
from trio_mojo._core._wire import encode_message
from trio_mojo._endpoint import Endpoint
from trio_mojo._sandbox import SandboxPolicy, SandboxReport
from trio_mojo._sandbox._apply import (
    close_other_fds,
    lock_down,
    set_parent_death_signal,
)

from ._broker import BROKER_SWITCH, BrokerClient, set_current_broker
from ._handshake import (
    GO_AHEAD_TIMEOUT,
    NO_GO_AHEAD_EXIT,
    SANDBOX_FAILED_EXIT,
    TARGET_FAILED_EXIT,
    target_failed,
    wait_for_go_ahead,
    with_nonce,
)
from ._importable import answer
from ._spawn import CHANNEL_SWITCH, recover_endpoint
from ._target import Target, TargetLoadError, load_target, print_import_traceback

_USAGE: Final = (
    "usage: python -I -m trio_mojo._workers._bootstrap --target=MOD:FUNC --parent-pid=P "
    "--sandbox=JSON [--startup-timeout=S] --mojo-platform-channel-handle=N "
    "[--trio-mojo-broker-handle=M]\n"
    "   or: python -I -m trio_mojo._workers._bootstrap --find-module=MODULE\n"
    "This is the entry point of trio_mojo workers; start it with trio_mojo.open_worker()."
)


def _option(argv: Sequence[str], name: str) -> str | None:
    prefix = f"--{name}="
    for arg in argv:
        if arg.startswith(prefix):
            return arg[len(prefix) :]
    return None


def _fd_of(argv: Sequence[str], switch: str) -> int | None:
    value = _option(argv, switch.removeprefix("--"))
    return int(value) if value is not None and value.isdigit() else None


def report_target_failure(
    channel_ep: Endpoint, spec: str, error: TargetLoadError, startup_timeout: float
) -> int:
    """Tell the parent why target ``spec`` cannot run; the exit status to use.

    Sends the one line as the first message on the channel, in place of the
    sandbox report (the channel is closed after it), and prints the
    traceback of an import that raised to stderr.  A parent that is gone
    or does not read within ``startup_timeout`` seconds is not waited for.
    """
    print_import_traceback(error)
    payload = encode_message(target_failed(spec, str(error)))
    with socket.socket(fileno=channel_ep.detach()) as sock:
        sock.settimeout(startup_timeout)
        with contextlib.suppress(OSError):
            sock.sendall(payload)
    return TARGET_FAILED_EXIT


async def _run(
    target: Target,
    report: SandboxReport,
    channel_ep: Endpoint,
    broker_ep: Endpoint | None,
    startup_timeout: float,
) -> int:
    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(open_channel(channel_ep))
        if broker_ep is not None:
            broker_channel = await stack.enter_async_context(open_channel(broker_ep))
            set_current_broker(BrokerClient(broker_channel))
        await channel.send(Message(report.to_bytes()))
        if not report.ok:
            return SANDBOX_FAILED_EXIT
        if not await wait_for_go_ahead(channel, report, startup_timeout):
            return NO_GO_AHEAD_EXIT
        await target(channel)
    return 0


def lock_down_and_run(
    target: Target,
    policy: SandboxPolicy,
    channel_ep: Endpoint,
    broker_ep: Endpoint | None = None,
    startup_timeout: float = GO_AHEAD_TIMEOUT,
    *,
    own_pid_namespace: bool = False,
) -> int:
    """All a worker does after its imports: lock down, report, await the
    go-ahead, run the target.  Returns the exit status.

    It assumes nothing about how the process started: this bootstrap calls
    it after ``exec``, and a child forked from a pre-imported process (a
    zygote) calls it alike, with ``own_pid_namespace`` when the zygote
    forked it into a PID namespace of its own (``_sandbox._apply.lock_down``).
    The process must be single-threaded.
    """
    keep = {channel_ep.fileno()}
    if broker_ep is not None:
        keep.add(broker_ep.fileno())
    report = with_nonce(lock_down(policy, keep, own_pid_namespace=own_pid_namespace))
    return trio.run(_run, target, report, channel_ep, broker_ep, startup_timeout)


def main(argv: Sequence[str]) -> int:
    """Run a worker; returns the process exit status.

    With ``--find-module=NAME`` instead, only print what this interpreter
    imports from and where it finds module ``NAME``, without importing it
    (``_importable``): the parent asks so before it starts a worker.
    """
    module = _option(argv, "find-module")
    if module is not None:
        print(answer([module]))
        return 0
    spec = _option(argv, "target")
    parent = _option(argv, "parent-pid")
    policy_json = _option(argv, "sandbox")
    channel_fd = _fd_of(argv, CHANNEL_SWITCH)
    broker_fd = _fd_of(argv, BROKER_SWITCH)
    if spec is None or parent is None or policy_json is None or channel_fd is None:
        print(_USAGE, file=sys.stderr)
        return 2
    keep = {channel_fd} | ({broker_fd} if broker_fd is not None else set())
    close_other_fds(keep)
    set_parent_death_signal(int(parent))
    policy = SandboxPolicy.from_json(policy_json)
    channel_ep = recover_endpoint(argv)
    broker_ep = (
        recover_endpoint(argv, switch=BROKER_SWITCH) if broker_fd is not None else None
    )
    timeout = float(_option(argv, "startup-timeout") or GO_AHEAD_TIMEOUT)
    try:
        target = load_target(spec)
    except TargetLoadError as error:
        if broker_ep is not None:
            broker_ep.close()
        return report_target_failure(channel_ep, spec, error, timeout)
    return lock_down_and_run(target, policy, channel_ep, broker_ep, timeout)


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.exit(status)
