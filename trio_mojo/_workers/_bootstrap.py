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
3. import the target, *before* the sandbox (imports need the file system);
4. adopt the channel fds (validated, close-on-exec) and, in
   :func:`lock_down_and_run`, lock down (``_sandbox._apply.lock_down``:
   every layer of the policy, in order; with a PID namespace this process
   becomes the worker's supervisor and the rest runs in the worker process
   proper);
5. under ``trio.run``: open the channel, send the sandbox report as the
   first message; if a required layer failed, exit with
   :data:`~trio_mojo._workers._handshake.SANDBOX_FAILED_EXIT`; otherwise
   wait for the parent's go-ahead (``_handshake``; at most ``S`` seconds)
   and only then call ``await target(channel)``.

Steps 4 and 5 are :func:`lock_down_and_run`, which a child forked from a
pre-imported process (a zygote) calls the same way.  The exit status is 0
when the target returns, 1 (with a traceback on
stderr, which the parent keeps) when it raises, and
:data:`~trio_mojo._workers._handshake.NO_GO_AHEAD_EXIT` when no go-ahead came.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from typing import Final

import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._core._message import Message
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
    wait_for_go_ahead,
    with_nonce,
)
from ._spawn import CHANNEL_SWITCH, recover_endpoint

Target = Callable[[Channel], Awaitable[object]]

_USAGE: Final = (
    "usage: python -I -m trio_mojo._workers._bootstrap --target=MOD:FUNC --parent-pid=P "
    "--sandbox=JSON [--startup-timeout=S] --mojo-platform-channel-handle=N "
    "[--trio-mojo-broker-handle=M]\n"
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


def _load_target(spec: str) -> Target:
    module_name, _, function_name = spec.partition(":")
    module = importlib.import_module(module_name)
    target = getattr(module, function_name)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target  # type: ignore[no-any-return]


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
    """Run a worker; returns the process exit status."""
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
    target = _load_target(spec)
    policy = SandboxPolicy.from_json(policy_json)
    channel_ep = recover_endpoint(argv)
    broker_ep = (
        recover_endpoint(argv, switch=BROKER_SWITCH) if broker_fd is not None else None
    )
    timeout = float(_option(argv, "startup-timeout") or GO_AHEAD_TIMEOUT)
    return lock_down_and_run(target, policy, channel_ep, broker_ep, timeout)


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.exit(status)
