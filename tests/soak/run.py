"""Soak: hours of mixed traffic with sandboxed workers; memory, fds and tasks stay flat.

``nox -s soak -- --minutes N`` runs this (``--help`` for the rest).  For
``N`` minutes the parent drives ``strict()`` workers running
``soak_target:digest`` (``tests/soak/target``), in two ways at once:

* a pool (``open_worker_pool``, zygote-forked workers unless
  ``--no-zygote``, recycled after ``--max-requests`` requests each, each
  holding at most ``--max-in-flight`` requests) fed by ``--clients`` tasks
  calling ``run``, about one request in ten cancelled after a random short
  time;
* one task of churn: ``open_worker`` (a fresh interpreter each time)
  exchanging a few messages on the worker's channel directly, sends and
  receives cancelled at random (a cancelled receive loses nothing: its
  reply comes with the next one), one worker in ten killed by cancelling
  its whole block.

Each request carries 0 B to 1 MiB of random payload (mostly small) and 0
to 16 fds (memfds holding 0 to 4 KiB of random bytes).  The worker replies
with SHA-256 digests of the payload and of each fd's content, read in the
sandbox, and hands the fds back (some requests also get their payload
back); the parent checks every digest, that each fd that comes back is the
one it sent (device and inode) and close-on-exec, and counts the messages
and fds so checked.

Every ``--interval`` seconds the workload pauses at a quiet point (no
request or worker of the workload in progress: what is left open is what
the parent keeps between requests), and the parent's RSS, open fds, Trio
tasks and child processes are sampled.  At the end: a table of the
samples, ``soak.csv`` (every sample) and ``soak.png`` (the plot), all in
``--output`` next to ``soak.log`` (a copy of this output).

The trend criterion.  The first half of the run is the warm-up (caches,
pool lanes and allocator arenas reach their size); over the second half a
least-squares line is fitted to each of RSS, fds and tasks, and the growth
it implies over that half (slope times its length) must stay within a
tolerance: RSS 16 MiB plus 5% of its median, fds 8, tasks 8.  A leak of
one fd or task in every thousand requests, or of a KiB per request, grows
far past that in minutes; the noise of a quiet point (a recycled worker
still exiting, the allocator's high-water mark) does not, and timings are
not judged at all (the machine is shared).  Then, after every worker was
closed: no child process is left (running or zombie), and the parent's
fds and tasks are exactly those it had before the workload.

The workers run ``strict()``, each with ids of its own (the default): no
other process shares the kernel's per-user counts (fds in flight,
processes) with one of them.

Three findings of this soak shaped its defaults (their regression tests are
in ``tests/test_soak_findings.py``).  ``--max-in-flight`` is 2, not the
pool's 32: a ``strict()`` worker has 256 open files; the kernel refuses
(``ETOOMANYREFS``) a ``sendmsg`` once the fds in flight from its user pass
256, which kills the worker, and a
worker whose target falls behind reads ahead more than 256 fds
(``MSG_CTRUNC``), which kills it too.  With 3 workers holding 32 requests
of up to 16 fds each, the first came within 2 minutes.  And a zygote
killed itself when its reply to a fork overtook the request's registration
(in one of two 1-minute runs, at its 128th fork), so the first 30-minute
run used ``--no-zygote``; that one is fixed.

Exit status: 0 when every check passed, 1 otherwise (each failure is
printed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import trio

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:  # for ``_fds`` and ``_process_support``
    sys.path.insert(0, str(TESTS))

from _chaos_support import all_tasks  # noqa: E402
from _fds import open_fds  # noqa: E402
from _process_support import children  # noqa: E402
from soak_target import ECHO, digests  # noqa: E402

from trio_mojo import (  # noqa: E402
    Channel,
    Handle,
    Message,
    SandboxPolicy,
    open_worker,
    open_worker_pool,
)

TARGET = "soak_target:digest"
MAX_PAYLOAD = 1 << 20
MAX_FDS = 16
MAX_FD_CONTENT = 4096
CANCEL_ONE_IN = 10
"""About one request (and one churn worker) in this many is cancelled."""
TOLERANCE = {"rss_mib": (16.0, 0.05), "fds": (8.0, 0.0), "tasks": (8.0, 0.0)}
"""Per metric: (absolute, relative to the median) growth allowed over the
second half of the run."""


class Say:
    """Print a line to the terminal and to the log."""

    def __init__(self, log: TextIO) -> None:
        self.log = log

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()


@dataclass
class Counts:
    """What the workload did and checked."""

    messages: int = 0
    fds: int = 0
    payload_bytes: int = 0
    cancelled: int = 0
    churn_workers: int = 0
    churn_killed: int = 0


@dataclass
class Sample:
    """The parent at one quiet point."""

    seconds: float
    rss_mib: float
    fds: int
    tasks: int
    children: int
    messages: int


@dataclass
class Expected:
    """What the reply to one request must be."""

    reply: bytes
    files: list[tuple[int, int]]  # (st_dev, st_ino) of each fd, in order


class Gate:
    """Lets the sampler pause the workload at a quiet point."""

    def __init__(self) -> None:
        self.active = 0
        self._open = trio.Event()
        self._open.set()
        self._idle = trio.Event()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One unit of work (a request, a churn worker's life)."""
        await self._open.wait()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No unit of work runs inside this block."""
        self._open = trio.Event()
        try:
            while self.active:
                self._idle = trio.Event()
                await self._idle.wait()
            yield
        finally:
            self._open.set()


# ----------------------------------------------------------------------
# Requests and replies


def _memfd(content: bytes) -> Handle:
    fd = os.memfd_create("soak", os.MFD_CLOEXEC)
    handle = Handle(fd)
    try:
        os.write(fd, content)
    except BaseException:
        handle.close()
        raise
    return handle


def _payload_size(rng: random.Random) -> int:
    """Mostly small, some up to 64 KiB, a few up to 1 MiB."""
    roll = rng.random()
    if roll < 0.5:
        return rng.randint(0, 1024)
    if roll < 0.85:
        return rng.randint(1025, 65536)
    return rng.randint(65537, MAX_PAYLOAD)


def make_request(rng: random.Random) -> tuple[Message, Expected]:
    """A random request and the reply it must get."""
    payload = bytearray(rng.randbytes(_payload_size(rng)))
    echo = rng.random() < 0.2
    if payload:
        payload[0] = ECHO if echo else payload[0] & 0x0F
    contents = [
        rng.randbytes(rng.randint(0, MAX_FD_CONTENT))
        for _ in range(rng.randint(0, MAX_FDS))
    ]
    handles: list[Handle] = []
    try:
        handles.extend(_memfd(content) for content in contents)
        files = [_identity(handle) for handle in handles]
    except BaseException:
        for handle in handles:
            handle.close()
        raise
    data = bytes(payload)
    reply = digests(data, contents) + (data if echo and data else b"")
    return Message(data, handles), Expected(reply, files)


def _identity(handle: Handle) -> tuple[int, int]:
    status = os.fstat(handle.fileno())
    return status.st_dev, status.st_ino


def check_reply(reply: Message, expected: Expected, counts: Counts) -> None:
    """The reply is right (else AssertionError); count it; close its fds."""
    with reply:
        assert reply.payload == expected.reply, (
            f"reply of {len(reply.payload)} bytes differs from the "
            f"{len(expected.reply)} expected"
        )
        files = [_identity(handle) for handle in reply.handles]
        assert files == expected.files, f"fds came back as {files}, sent {expected}"
        for handle in reply.handles:
            flags = fcntl.fcntl(handle.fileno(), fcntl.F_GETFD)
            assert flags & fcntl.FD_CLOEXEC, "a received fd is inheritable"
    counts.messages += 1
    counts.fds += len(expected.files)
    counts.payload_bytes += len(reply.payload)


def _cancel_after(rng: random.Random) -> float:
    """A deadline in seconds: mostly none, sometimes a short random one."""
    if rng.randrange(CANCEL_ONE_IN):
        return math.inf
    return rng.choice((0.0, 0.0005, 0.002, 0.01))


# ----------------------------------------------------------------------
# The workload


async def pool_client(
    pool_run: Callable[[Message], Awaitable[Message]],
    rng: random.Random,
    counts: Counts,
    gate: Gate,
) -> None:
    """Send requests to the pool for ever; check each reply."""
    while True:
        async with gate.turn():
            request, expected = make_request(rng)
            with trio.move_on_after(_cancel_after(rng)) as scope:
                reply = await pool_run(request)
            if scope.cancelled_caught:
                counts.cancelled += 1
                continue
            check_reply(reply, expected, counts)


async def _exchange(
    channel: Channel,
    rng: random.Random,
    counts: Counts,
    pending: collections.deque[Expected],
) -> None:
    """One request on a worker's own channel; cancellations at random."""
    request, expected = make_request(rng)
    with trio.move_on_after(_cancel_after(rng)) as scope:
        try:
            await channel.send(request)
        except BaseException:
            request.close()  # a cancelled send leaves the fds with the caller
            raise
    if scope.cancelled_caught:
        counts.cancelled += 1
        return
    pending.append(expected)
    with trio.move_on_after(_cancel_after(rng)) as scope:
        reply = await channel.receive()
        check_reply(reply, pending.popleft(), counts)
    if scope.cancelled_caught:
        counts.cancelled += 1  # its reply comes with the next receive


async def churn(
    policy: SandboxPolicy, rng: random.Random, counts: Counts, gate: Gate
) -> None:
    """Start a worker, talk to it, close it (or kill it), for ever."""
    while True:
        async with gate.turn():
            kill = not rng.randrange(CANCEL_ONE_IN)
            exchanges = rng.randint(1, 20)
            with trio.CancelScope() as scope:
                async with open_worker(TARGET, sandbox=policy) as worker:
                    counts.churn_workers += 1
                    pending: collections.deque[Expected] = collections.deque()
                    for done in range(exchanges):
                        if kill and done == exchanges // 2:
                            scope.cancel()  # leaving by cancellation kills it
                        await _exchange(worker.channel, rng, counts, pending)
                    while pending:
                        check_reply(await worker.channel.receive(), pending[0], counts)
                        pending.popleft()
            if scope.cancelled_caught:
                counts.churn_killed += 1


def sample(started: float, counts: Counts) -> Sample:
    """The parent now (call at a quiet point)."""
    rss_kib = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return Sample(
        seconds=time.monotonic() - started,
        rss_mib=rss_kib / 1024,
        fds=len(open_fds()),
        tasks=len(all_tasks()),
        children=len(children()),
        messages=counts.messages,
    )


async def soak(
    args: argparse.Namespace, say: Say, samples: list[Sample], counts: Counts
) -> None:
    """Run the workload for ``args.minutes``, filling ``samples`` and ``counts``.

    Raises:
        AssertionError: a reply was wrong, or something was left behind.
    """
    rng = random.Random(args.seed)
    gate = Gate()
    policy = SandboxPolicy.strict()
    fds_before, tasks_before = open_fds(), all_tasks()
    started = time.monotonic()
    async with (
        open_worker_pool(
            TARGET,
            workers=args.workers,
            sandbox=policy,
            max_requests=args.max_requests,
            zygote=args.zygote,
            max_in_flight=args.max_in_flight,
        ) as pool,
        trio.open_nursery() as nursery,
    ):
        for number in range(args.clients):
            client_rng = random.Random(rng.getrandbits(64))
            nursery.start_soon(
                pool_client, pool.run, client_rng, counts, gate, name=f"client {number}"
            )
        nursery.start_soon(
            churn, policy, random.Random(rng.getrandbits(64)), counts, gate
        )
        end = started + args.minutes * 60
        while time.monotonic() < end:
            await trio.sleep(min(args.interval, max(end - time.monotonic(), 0)))
            async with gate.paused():
                samples.append(sample(started, counts))
            say(_row(samples[-1]))
        async with gate.paused():
            nursery.cancel_scope.cancel()
        stats = pool.statistics()
    say(
        f"pool: {stats.workers_started} workers started, "
        f"{stats.workers_recycled} recycled, {stats.workers_replaced} replaced, "
        f"{stats.answered} answered, {stats.failed} failed",
    )
    assert stats.failed == 0, f"the pool failed {stats.failed} request(s)"
    assert stats.workers_replaced == 0, "a pool worker died and was replaced"
    _check_nothing_left(fds_before, tasks_before)


def _check_nothing_left(
    fds_before: set[int], tasks_before: set[trio.lowlevel.Task]
) -> None:
    left = children()
    assert not left, f"child processes left behind: {left}"
    with contextlib.suppress(ChildProcessError):
        pid, status = os.waitpid(-1, os.WNOHANG)
        raise AssertionError(f"a child was left to reap: {pid} (status {status})")
    extra_fds = open_fds() - fds_before
    assert not extra_fds, f"fds left open: {sorted(extra_fds)}"
    extra_tasks = all_tasks() - tasks_before
    assert not extra_tasks, f"tasks left: {[task.name for task in extra_tasks]}"


# ----------------------------------------------------------------------
# Judging and showing the samples

HEADER = (
    f"{'min':>6} {'RSS MiB':>8} {'fds':>5} {'tasks':>6} {'children':>8} {'messages':>9}"
)


def _row(s: Sample) -> str:
    return (
        f"{s.seconds / 60:6.2f} {s.rss_mib:8.1f} {s.fds:5d} {s.tasks:6d} "
        f"{s.children:8d} {s.messages:9d}"
    )


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs``."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return (
        sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    )


def second_half(samples: Sequence[Sample]) -> list[Sample]:
    """The samples after the warm-up (the first half of the run)."""
    if not samples:
        return []
    middle = samples[-1].seconds / 2
    return [s for s in samples if s.seconds >= middle]


def trend_failures(samples: Sequence[Sample], say: Say) -> list[str]:
    """Judge the trend of each metric over the second half (see the module
    docstring); print the fit; return what failed."""
    tail = second_half(samples)
    if len(tail) < 4:
        return [f"only {len(tail)} samples after the warm-up: run longer"]
    xs = [s.seconds for s in tail]
    span = xs[-1] - xs[0]
    failures = []
    for metric, (absolute, relative) in TOLERANCE.items():
        ys = [float(getattr(s, metric)) for s in tail]
        growth = slope(xs, ys) * span
        allowed = absolute + relative * statistics.median(ys)
        verdict = "flat" if growth <= allowed else "GROWS"
        say(
            f"trend {metric:>7}: {growth:+9.2f} over the last {span / 60:.1f} min "
            f"(allowed {allowed:.2f}): {verdict}",
        )
        if growth > allowed:
            failures.append(f"{metric} grows by {growth:.2f} (allowed {allowed:.2f})")
    return failures


def print_table(samples: Sequence[Sample], say: Say, rows: int = 16) -> None:
    """At most ``rows`` samples, evenly spaced, the last one included."""
    step = max(1, math.ceil(len(samples) / rows))
    chosen = list(samples[::step])
    if samples and chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    say(HEADER)
    for s in chosen:
        say(_row(s))


def write_csv(samples: Sequence[Sample], path: Path) -> None:
    lines = ["seconds,rss_mib,fds,tasks,children,messages"]
    lines += [
        f"{s.seconds:.1f},{s.rss_mib:.2f},{s.fds},{s.tasks},{s.children},{s.messages}"
        for s in samples
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(samples: Sequence[Sample], path: Path) -> None:
    """RSS, fds and tasks over time; the warm-up shaded, the fit drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.seconds / 60 for s in samples]
    tail = second_half(samples)
    figure, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    for axis, metric, label in zip(
        axes, TOLERANCE, ("parent RSS (MiB)", "open fds", "Trio tasks"), strict=True
    ):
        axis.plot(minutes, [getattr(s, metric) for s in samples], ".-", lw=0.8)
        if tail:
            axis.axvspan(0, tail[0].seconds / 60, color="0.92", label="warm-up")
            xs = [s.seconds for s in tail]
            ys = [float(getattr(s, metric)) for s in tail]
            fit = slope(xs, ys)
            mid_x, mid_y = statistics.fmean(xs), statistics.fmean(ys)
            axis.plot(
                [xs[0] / 60, xs[-1] / 60],
                [mid_y + fit * (xs[0] - mid_x), mid_y + fit * (xs[-1] - mid_x)],
                "r--",
                label="least squares, second half",
            )
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    axes[-1].set_xlabel("minutes")
    figure.suptitle("trio_mojo soak: the parent at each quiet point")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds")
    parser.add_argument("--workers", type=int, default=3, help="pool workers")
    parser.add_argument("--max-requests", type=int, default=50)
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=2,
        help="requests a pool worker holds (see the docstring)",
    )
    parser.add_argument("--clients", type=int, default=4, help="tasks using the pool")
    parser.add_argument(
        "--no-zygote",
        dest="zygote",
        action="store_false",
        help="start each pool worker as an interpreter of its own",
    )
    parser.add_argument("--output", type=Path, default=Path("build/soak"))
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(32)
    args.output.mkdir(parents=True, exist_ok=True)
    log_path = args.output / "soak.log"
    with log_path.open("w") as log:
        say = Say(log)
        say(
            f"soak: {args.minutes} min, seed {args.seed}, {args.workers} pool "
            f"workers (max_requests={args.max_requests}, "
            f"max_in_flight={args.max_in_flight}, "
            f"{'forked by a zygote' if args.zygote else 'no zygote'}), "
            f"{args.clients} clients, 1 churn task; strict() sandbox",
        )
        say(HEADER)
        failures: list[str] = []
        samples: list[Sample] = []
        counts = Counts()
        try:
            trio.run(soak, args, say, samples, counts)
        except Exception as exc:  # a finding: still show what was measured
            traceback.print_exc()
            failures.append(f"the workload stopped: {exc!r}")
        say(
            f"checked {counts.messages} messages ({counts.payload_bytes / 2**20:.0f} "
            f"MiB of replies) and {counts.fds} fds; {counts.cancelled} cancelled; "
            f"{counts.churn_workers} churn workers ({counts.churn_killed} killed)",
        )
        say("samples:")
        print_table(samples, say)
        failures += trend_failures(samples, say)
        write_csv(samples, args.output / "soak.csv")
        plot(samples, args.output / "soak.png")
        say(f"log, csv and plot in {args.output.resolve()}")
        for failure in failures:
            say(f"FAILED: {failure}")
        if not failures:
            say("soak passed: every reply checked, nothing grows")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
