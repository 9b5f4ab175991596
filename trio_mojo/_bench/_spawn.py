"""``python -m trio_mojo bench spawn``: how fast a sandboxed worker starts.

Measured in one run, each figure the median of ``--reps`` repetitions:

* **Spawn-to-first-message**: from the call that starts a worker until the
  first reply of its target has arrived (the worker echoes one short
  message), for a ``strict()`` worker forked by a zygote (started
  beforehand, not counted), a ``strict()`` worker started by
  ``open_worker`` (an interpreter start and its imports), and a
  ``multiprocessing`` child echoing over a ``Pipe`` with the ``forkserver``
  (server started beforehand) and ``spawn`` start methods.  The
  ``multiprocessing`` children are not sandboxed.  Each trio_mojo sample
  is followed by one of its reference (zygote / forkserver, open_worker /
  spawn), so that the ratios printed compare figures taken under the same
  load.
* **Concurrent start**: ``--concurrent`` (100) ``strict()`` workers started
  at once, from a zygote and spawned, and as many forkserver children; the
  time until every one of them has answered one message.  All of them stay
  alive until the last answered.
* **Where the milliseconds go** on the zygote path: the parent's view (the
  request until the pid is back, the worker's sandbox and report, the
  parent's ``/proc`` checks, the first round trip), and the forked child's
  own steps, timed by a profiling process that imports and warms up
  exactly as a zygote does and forks with the zygote's own code (the init
  of the worker's PID namespace included), then stamps each step of the
  child's path (fd layout, each sandbox layer, the start of ``trio.run``,
  the channel and the go-ahead).

Timings on a shared 2-core machine are noisy: the load average is printed
before and after; compare the figures of one run with each other.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import trio

from trio_mojo._channel import Channel, open_channel
from trio_mojo._core._message import Message
from trio_mojo._endpoint import channel_pair
from trio_mojo._sandbox import SandboxPolicy, SandboxReport
from trio_mojo._sandbox._verify import verify_report
from trio_mojo._workers._output import ChildOutput
from trio_mojo._workers._spawn import CHANNEL_SWITCH
from trio_mojo._workers._worker import _handshake, open_worker
from trio_mojo._workers._zygote import Zygote, open_zygote

__all__ = ["PROFILE_TARGET", "main", "send_stamps"]

TARGET: Final = "trio_mojo._examples:echo"
_PROBE: Final = b"first"
_ZYGOTE_STEPS: Final = ("request to pid", "sandbox, report, checks, go-ahead",
                        "first round trip", "of which /proc checks")  # fmt: skip


def _ms(seconds: float) -> float:
    return seconds * 1000


def _summary(samples: Sequence[float]) -> dict[str, Any]:
    return {
        "median_ms": _ms(statistics.median(samples)),
        "min_ms": _ms(min(samples)),
        "max_ms": _ms(max(samples)),
        "n": len(samples),
    }


# ---------------------------------------------------------------- trio_mojo


async def _echo_once(channel: Channel) -> None:
    await channel.send(Message(_PROBE))
    reply = await channel.receive()
    reply.close()
    if reply.payload != _PROBE:
        raise RuntimeError(f"the worker echoed {reply.payload!r}")


async def _first_message(policy: SandboxPolicy, zygote: Zygote | None = None) -> float:
    """Seconds from ``open_worker``'s call to its target's first reply."""
    t0 = time.perf_counter()
    async with open_worker(TARGET, sandbox=policy, zygote=zygote) as worker:
        await _echo_once(worker.channel)
        return time.perf_counter() - t0


async def _zygote_steps(zygote: Zygote, steps: dict[str, list[float]]) -> None:
    """One forked worker through ``open_worker``'s own pieces, each timed."""
    policy = zygote.sandbox
    t0 = time.perf_counter()
    local, remote = channel_pair()
    process = await zygote._start_worker(TARGET, policy, {CHANNEL_SWITCH: remote})
    t1 = time.perf_counter()
    try:
        async with open_channel(local) as channel:
            report, pid = await _handshake(
                channel, process, ChildOutput(), TARGET, policy, 30.0
            )
            t2 = time.perf_counter()
            verify_report(pid, policy, report)  # once more, alone
            t3 = time.perf_counter()
            await _echo_once(channel)
            t4 = time.perf_counter()
        await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stderr is not None:
                await process.stderr.aclose()
    for name, seconds in zip(
        _ZYGOTE_STEPS, (t1 - t0, t2 - t1, t4 - t3, t3 - t2), strict=True
    ):
        steps.setdefault(name, []).append(seconds)


async def _concurrent(count: int, start_one: Callable[[trio.Event], Awaitable[None]]) -> float:  # fmt: skip
    """Start ``count`` workers at once; seconds until all answered once.

    ``start_one`` starts a worker, has it answer, sets its event and then
    waits (the worker stays alive) until it is cancelled, once all answered.
    """
    answered = 0
    all_answered = trio.Event()
    elapsed = 0.0
    t0 = time.perf_counter()

    async def one() -> None:
        nonlocal answered, elapsed
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_one, done)
            await done.wait()
            answered += 1
            if answered == count:
                elapsed = time.perf_counter() - t0
                all_answered.set()
            await all_answered.wait()
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return elapsed


async def _measure(reps: int, concurrent: int, references: bool) -> dict[str, Any]:
    """Every measurement but the child's steps; with ``references``, each
    trio_mojo sample is followed by one of its ``multiprocessing``
    counterpart (zygote / forkserver, open_worker / spawn), so that the
    ratios compare figures taken under the same load."""
    policy = SandboxPolicy.strict()
    samples: dict[str, list[float]] = {}
    result: dict[str, Any] = {}
    steps: dict[str, list[float]] = {}

    async def pairs(name: str, zygote: Zygote | None, method: str) -> None:
        context = multiprocessing.get_context(method) if references else None
        await _first_message(policy, zygote)  # warm up this process's side
        if context is not None:
            _mp_first_message(context)  # starts the fork server; warms up
        for _ in range(reps):
            samples.setdefault(name, []).append(await _first_message(policy, zygote))
            if context is not None:
                samples.setdefault(f"mp_{method}", []).append(
                    _mp_first_message(context)
                )

    with _multiprocessing_cleanup():
        _progress(f"[spawn] zygote and mp forkserver: {reps} x spawn-to-first-message")
        async with open_zygote(preload=[TARGET], sandbox=policy) as zygote:
            await pairs("zygote", zygote, "forkserver")
            for _ in range(reps):
                await _zygote_steps(zygote, steps)
            result["zygote_steps"] = {name: _summary(v) for name, v in steps.items()}
            _progress(f"[spawn] zygote: {concurrent} strict() workers at once")
            result["zygote_concurrent_s"] = await _concurrent(
                concurrent, _alive_until_cancelled(zygote)
            )
        if references:
            _progress(f"[spawn] mp forkserver: {concurrent} children at once")
            result["mp_forkserver_concurrent_s"] = _mp_concurrent(concurrent)
        _progress(f"[spawn] open_worker and mp spawn: {reps} x spawn-to-first-message")
        await pairs("spawned", None, "spawn")
    result.update({name: _summary(values) for name, values in samples.items()})
    return result


async def _spawned_concurrent(concurrent: int) -> float:
    """``concurrent`` spawned ``strict()`` workers at once (run last: 100
    interpreters starting together load the machine for a while)."""
    _progress(f"[spawn] open_worker: {concurrent} strict() workers at once")
    return await _concurrent(concurrent, _alive_until_cancelled(None))


def _alive_until_cancelled(zygote: Zygote | None) -> Callable[[trio.Event], Awaitable[None]]:  # fmt: skip
    """Start a ``strict()`` worker (forked from ``zygote``, or spawned), have
    it answer, set the event, and keep it alive until cancelled."""

    async def start_one(done: trio.Event) -> None:
        async with open_worker(TARGET, sandbox=SandboxPolicy.strict(), zygote=zygote) as worker:  # fmt: skip
            await _echo_once(worker.channel)
            done.set()
            await trio.sleep_forever()

    return start_one


# ---------------------------------------------------------------- multiprocessing

_MP_ECHO: Final = "connection.send_bytes(connection.recv_bytes())"
"""The multiprocessing child's whole job.  Run with ``exec`` (a builtin, so
the child imports nothing but multiprocessing itself: the fairest reference)."""


def _mp_first_message(context: Any) -> float:
    parent_end, child_end = context.Pipe()
    process = context.Process(target=exec, args=(_MP_ECHO, {"connection": child_end}))
    t0 = time.perf_counter()
    process.start()
    parent_end.send_bytes(_PROBE)
    reply = parent_end.recv_bytes()
    elapsed = time.perf_counter() - t0
    child_end.close()
    parent_end.close()
    process.join()
    if reply != _PROBE or process.exitcode != 0:
        raise RuntimeError(f"multiprocessing child: {reply!r}, exit {process.exitcode}")
    return elapsed


def _mp_concurrent(count: int) -> float:
    """Start ``count`` forkserver children; seconds until all answered once."""
    context = multiprocessing.get_context("forkserver")
    children = []
    t0 = time.perf_counter()
    for _ in range(count):
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=exec, args=(_MP_ECHO, {"connection": child_end})
        )
        process.start()
        child_end.close()
        parent_end.send_bytes(_PROBE)
        children.append((process, parent_end))
    replies = [parent_end.recv_bytes() for _, parent_end in children]
    elapsed = time.perf_counter() - t0
    for process, parent_end in children:
        parent_end.close()
        process.join()
    if set(replies) != {_PROBE}:
        raise RuntimeError("a multiprocessing child did not echo")
    return elapsed


@contextlib.contextmanager
def _multiprocessing_cleanup() -> Iterator[None]:
    """Leave no process or fd of ``multiprocessing`` behind (the bench may
    run inside a test): the stdlib's own tests stop these two the same way."""
    from multiprocessing import forkserver, resource_tracker

    try:
        yield
    finally:
        forkserver._forkserver._stop()  # type: ignore[attr-defined]
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the child's steps


class _Stamps:
    """``(step, time.monotonic())`` pairs: one clock for every process."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float]] = []

    def __call__(self, step: str) -> None:
        if any(name == step for name, _ in self.stamps):
            step += " (again)"  # a layer applied in two phases
        self.stamps.append((step, time.monotonic()))


_STAMPS: Final = _Stamps()
"""The profiled child's stamps (see :func:`_profile_children`)."""
PROFILE_TARGET: Final = f"{__name__}:send_stamps"


async def send_stamps(channel: Channel) -> None:
    """The profiled worker's target: send its stamps, one JSON message."""
    _STAMPS("channel, report, go-ahead")
    await channel.send(Message(json.dumps(_STAMPS.stamps).encode()))


def _stamped(step: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        _STAMPS(step)
        return result

    return call


def _install_probes() -> None:
    """Stamp the steps of the zygote's child path, without changing them."""
    from trio_mojo._sandbox import _apply
    from trio_mojo._workers import _bootstrap, _zygote_main

    def forked(expected_parent: int) -> None:
        _STAMPS("fork (and the namespace's init)")
        set_parent_death_signal(expected_parent)
        _STAMPS("parent-death signal")

    set_parent_death_signal = _zygote_main.__dict__["set_parent_death_signal"]
    _zygote_main.__dict__["set_parent_death_signal"] = forked
    for name, step in (
        ("_install_fds", "session and fds"),
        ("load_target", "import target (preloaded)"),
    ):
        setattr(_zygote_main, name, _stamped(step, getattr(_zygote_main, name)))
    apply = _apply._Lockdown.apply

    def apply_and_stamp(self: Any, layer: str, action: Callable[[], None]) -> None:
        apply(self, layer, action)
        _STAMPS(f"sandbox: {layer}")

    _apply._Lockdown.apply = apply_and_stamp  # type: ignore[method-assign]
    run = _bootstrap._run

    async def run_and_stamp(*args: Any) -> int:
        _STAMPS("trio.run start")
        return await run(*args)

    _bootstrap._run = run_and_stamp  # type: ignore[assignment]


def _profile_children(count: int) -> dict[str, list[float]]:
    """Fork ``count`` strict() workers as the zygote does, and time each step.

    Runs in a process of its own, prepared exactly as a zygote is (the same
    imports, the same warm-up, the same prepared seccomp program,
    ``gc.freeze``), and never inside ``trio.run``.  Each child is forked by
    the zygote's own code (``_Zygote._fork``: into a PID namespace of its
    own, next to its init, when this process may make one) and runs the
    zygote's child path with probes: the steps it calls are wrapped to
    stamp the time when they return (:class:`_Stamps`), each sandbox layer
    too; its target sends the stamps after the go-ahead.  A step's time is
    from the previous stamp (the first: from just before the fork here, to
    the child's first line).
    """
    import gc

    from trio_mojo._core._wire import encode_message
    from trio_mojo._handles import Handle
    from trio_mojo._sandbox._apply import prepare
    from trio_mojo._workers import _zygote_main
    from trio_mojo._workers import _zygote_protocol as protocol
    from trio_mojo._workers._handshake import go_ahead
    from trio_mojo._workers._target import load_target

    _install_probes()
    load_target(PROFILE_TARGET)  # preloaded, as the bench's zygote has it
    _zygote_main._warm_up()
    prepare()
    gc.freeze()
    control, _peer = socket.socketpair()  # the zygote's channel: never used here
    zygote = _zygote_main._Zygote(control, _zygote_main._namespace_forker())
    policy = SandboxPolicy.strict()
    request = protocol.SpawnRequest(
        id=1, target=PROFILE_TARGET, sandbox=policy.to_json(), fds=("channel", "stderr")
    )
    steps: dict[str, list[float]] = {}
    for _ in range(count):
        local, remote = channel_pair()
        err_read, err_write = os.pipe()
        fds = {"channel": Handle(remote.detach()), "stderr": Handle(err_write)}
        _STAMPS.stamps.clear()
        before = time.monotonic()
        pid, _ = zygote._fork(request, policy, fds)
        for handle in fds.values():
            handle.close()
        try:
            with (
                _blocking_socket(local.detach()) as sock,
                sock.makefile("rb") as stream,
            ):
                report = SandboxReport.from_bytes(_read_message(stream))
                sock.sendall(encode_message(go_ahead(report).payload))
                stamps = json.loads(_read_message(stream))
        except ValueError as exc:  # a short read: the child failed
            _reap(zygote, pid)
            raise RuntimeError(
                os.read(err_read, 65536).decode(errors="replace")
            ) from exc
        finally:
            os.close(err_read)
        _reap(zygote, pid)
        previous = before
        for name, when in stamps:
            steps.setdefault(name, []).append(when - previous)
            previous = when
    return steps


def _reap(zygote: Any, pid: int) -> None:
    """Reap a forked worker and, as the zygote does, its namespace's init."""
    init = zygote._init_of.get(pid)
    _, status = os.waitpid(pid, 0)
    zygote._reaped(pid, os.waitstatus_to_exitcode(status))  # kills the init
    if init is not None:
        _, status = os.waitpid(init, 0)
        zygote._reaped(init, os.waitstatus_to_exitcode(status))


def _blocking_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def _read_message(stream: Any) -> bytes:
    from trio_mojo._core._wire import HEADER_SIZE

    header = stream.read(HEADER_SIZE)
    size = int.from_bytes(header[:4], "little")
    payload: bytes = stream.read(max(size - HEADER_SIZE, 0))
    if len(header) < HEADER_SIZE or len(payload) != size - HEADER_SIZE:
        raise ValueError("the stream ended inside a message")
    return payload


def _measure_child_steps(count: int) -> dict[str, Any]:
    _progress(f"[spawn] the forked child's steps, {count} children")
    output = subprocess.run(
        [sys.executable, "-I", "-m", __name__, f"--profile-children={count}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    steps = json.loads(output)
    return {name: _summary(samples) for name, samples in steps.items()}


# ---------------------------------------------------------------- report


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _row(label: str, cell: dict[str, Any], note: str = "") -> str:
    return (
        f"  {label:<34} {cell['median_ms']:8.1f} ms   "
        f"[{cell['min_ms']:.1f} .. {cell['max_ms']:.1f}, n={cell['n']}]{note}"
    )


def _ratio(result: dict[str, Any], ours: str, theirs: str) -> str:
    if theirs not in result:
        return ""
    return (
        f"  ({result[ours]['median_ms'] / result[theirs]['median_ms']:.1f}x {theirs})"
    )


def render(result: dict[str, Any]) -> str:
    """The text report of one run."""
    meta = result["meta"]
    load = " / ".join(
        f"{when} {' '.join(f'{value:.2f}' for value in meta[f'load_{when}'])}"
        for when in ("before", "after")
    )
    lines = [
        f"Worker start-up ({meta['environment']})",
        f"load average (1, 5, 15 min): {load}",
        "",
        "spawn-to-first-message, median [min .. max]:",
        _row(
            "zygote, strict()",
            result["zygote"],
            _ratio(result, "zygote", "mp_forkserver"),
        ),
        _row(
            "open_worker, strict()",
            result["spawned"],
            _ratio(result, "spawned", "mp_spawn"),
        ),
    ]
    for method in ("forkserver", "spawn"):
        key = f"mp_{method}"
        if key in result:
            lines.append(
                _row(f"multiprocessing {method}", result[key], "  unsandboxed")
            )
    count = meta["concurrent"]
    lines += ["", f"{count} workers started at once, until all answered:"]
    lines.append(f"  zygote, strict()       {result['zygote_concurrent_s']:8.3f} s")
    if "spawned_concurrent_s" in result:
        lines.append(
            f"  open_worker, strict()  {result['spawned_concurrent_s']:8.3f} s"
        )
    if "mp_forkserver_concurrent_s" in result:
        seconds = result["mp_forkserver_concurrent_s"]
        lines.append(f"  mp forkserver          {seconds:8.3f} s  unsandboxed")
    lines += ["", "zygote path, the parent's view (median):"]
    lines += [_row(name, cell) for name, cell in result["zygote_steps"].items()]
    if "child_steps" in result:
        lines += ["", "the forked child's steps (median; the first: from the zygote's fork to the child's first line):"]  # fmt: skip
        lines += [_row(name, cell) for name, cell in result["child_steps"].items()]
    return "\n".join(lines) + "\n"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo bench spawn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=20, help="repetitions (default 20)")
    parser.add_argument("--concurrent", type=int, default=100,
                        help="workers started at once (default 100)")  # fmt: skip
    parser.add_argument("--no-spawned-concurrent", action="store_true",
                        help="skip starting --concurrent workers without a zygote "
                        "(about 0.1 s each)")  # fmt: skip
    parser.add_argument("--no-multiprocessing", action="store_true",
                        help="skip the multiprocessing references")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.concurrent < 1:
        parser.error("--reps and --concurrent must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the spawn benchmark; returns the exit status."""
    from ._cli import _environment

    args = _parse(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    result: dict[str, Any] = trio.run(
        _measure, args.reps, args.concurrent, not args.no_multiprocessing
    )
    result["child_steps"] = _measure_child_steps(args.reps)
    if not args.no_spawned_concurrent:
        result["spawned_concurrent_s"] = trio.run(_spawned_concurrent, args.concurrent)
    result["meta"] = {
        "environment": _environment(),
        "reps": args.reps,
        "concurrent": args.concurrent,
        "seconds": time.monotonic() - started,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(render(result), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    (option,) = sys.argv[1:]
    name, _, value = option.partition("=")
    if name != "--profile-children":
        sys.exit(f"usage: python -I -m {__spec__.name} --profile-children=N")
    print(json.dumps(_profile_children(int(value))))
