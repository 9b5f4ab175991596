"""``python -m trio_mojo demo``: hash files in sandboxed workers that cannot open them.

The parent opens every file and passes it to a worker as an fd over the
worker's channel; the worker reads the fd, computes SHA-256 and answers
with the digest.  The parent checks each digest against :mod:`hashlib` run
on its own copy of the file, and prints a table and each worker's sandbox
report.  It exercises spawning, fd passing, the sandbox report and clean
shutdown of a pool of workers.

Protocol on each worker's channel (payloads are bytes, no pickle):

* parent -> worker: ``job id (u32 LE)`` with one handle, the open file;
* worker -> parent: ``job id (u32 LE) | size (u64 LE) | sha256 (32 bytes)``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

import attrs
import trio

from ._channel import Channel
from ._core._message import Message
from ._handles import Handle
from ._sandbox import SandboxPolicy, SandboxReport
from ._workers._worker import open_worker

__all__ = ["hash_files", "main"]

_JOB: Final = struct.Struct("<I")
_RESULT: Final = struct.Struct("<IQ32s")
_CHUNK: Final = 1 << 20


def _sha256_fd(fd: int) -> tuple[int, bytes]:
    digest = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.digest()


async def hash_files(channel: Channel) -> None:
    """Worker target: hash each file sent as an fd; reply with its digest."""
    async for message in channel:
        with message:
            if len(message.payload) != _JOB.size or len(message.handles) != 1:
                raise ValueError("demo protocol: expected a job id and one fd")
            (job,) = _JOB.unpack(message.payload)
            fd = message.handles[0].fileno()
            size, digest = await trio.to_thread.run_sync(_sha256_fd, fd)
        await channel.send(Message(_RESULT.pack(job, size, digest)))


@attrs.define
class _Job:
    path: Path
    size: int = 0
    digest: str = ""
    expected: str = ""
    worker_pid: int = 0
    error: str = ""


def _collect(paths: Sequence[str]) -> list[Path]:
    if not paths:
        package = Path(__file__).resolve().parent
        return sorted(
            p
            for p in package.iterdir()
            if p.is_file() and p.suffix in (".py", ".typed")
        )
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def _expected_digest(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


class _Progress:
    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._tty = stream.isatty()
        self._next_line = 0.0

    def advance(self, job: _Job) -> None:
        self.done += 1
        text = f"[{self.done:>{len(str(self.total))}}/{self.total}] {job.path.name}"
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
        elif self.done == self.total or time.monotonic() >= self._next_line:
            self._next_line = time.monotonic() + 0.5
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")


async def _drive(
    channel: Channel,
    pid: int,
    jobs: trio.MemoryReceiveChannel[tuple[int, _Job]],
    progress: _Progress,
) -> None:
    async for index, job in jobs:
        try:
            fd = os.open(job.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            job.error = f"parent cannot open it: {exc.strerror}"
            progress.advance(job)
            continue
        await channel.send(Message(_JOB.pack(index), (Handle(fd),)))
        reply = await channel.receive()
        reply.close()
        answered, size, digest = _RESULT.unpack(reply.payload)
        if answered != index:
            raise RuntimeError(
                f"worker {pid} answered job {answered}, expected {index}"
            )
        job.size, job.digest, job.worker_pid = size, digest.hex(), pid
        job.expected = await trio.to_thread.run_sync(_expected_digest, job.path)
        progress.advance(job)


async def _run_worker(
    policy: SandboxPolicy,
    jobs: trio.MemoryReceiveChannel[tuple[int, _Job]],
    progress: _Progress,
    reports: list[SandboxReport],
) -> None:
    async with (
        jobs,
        open_worker("trio_mojo._demo:hash_files", sandbox=policy) as worker,
    ):
        reports.append(worker.sandbox_report)
        await _drive(worker.channel, worker.pid, jobs, progress)


async def _run(
    files: list[Path], workers: int, policy: SandboxPolicy
) -> tuple[list[_Job], list[SandboxReport]]:
    jobs = [_Job(path) for path in files]
    send, receive = trio.open_memory_channel[tuple[int, _Job]](len(jobs) or 1)
    for index, job in enumerate(jobs):
        send.send_nowait((index, job))
    send.close()
    progress = _Progress(len(jobs), sys.stderr)
    reports: list[SandboxReport] = []
    async with receive, trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(_run_worker, policy, receive.clone(), progress, reports)
    progress.finish()
    return jobs, reports


def _print_table(jobs: list[_Job]) -> None:
    width = max([len(str(job.path)) for job in jobs] + [4])
    print(f"{'file':<{width}}  {'size':>10}  {'sha256':<64}  {'worker':>7}  ok")
    for job in jobs:
        if job.error:
            print(f"{job.path!s:<{width}}  {'-':>10}  {job.error:<64}  {'-':>7}  -")
            continue
        ok = "yes" if job.digest == job.expected else "NO"
        print(
            f"{job.path!s:<{width}}  {job.size:>10}  {job.digest}  {job.worker_pid:>7}  {ok}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every digest matched)."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo demo",
        description=(
            "Hash files in a pool of sandboxed worker processes that cannot open them: "
            "the parent opens each file and passes it to a worker as a file descriptor "
            "over a trio_mojo channel; the worker returns its SHA-256, which the parent "
            "checks against hashlib.  Prints a table and each worker's sandbox report."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="files or directories to hash (default: the files of the installed trio_mojo)",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes (default 2)"
    )
    parser.add_argument(
        "--unsandboxed",
        action="store_true",
        help="run the workers with SandboxPolicy.none() instead of SandboxPolicy.basic()",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    files = _collect(args.paths)
    policy = (
        SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
        if args.unsandboxed
        else SandboxPolicy.basic()
    )
    started = time.monotonic()
    jobs, reports = trio.run(_run, files, args.workers, policy)
    elapsed = time.monotonic() - started
    _print_table(jobs)
    print(
        f"\n{len(files)} file(s) hashed by {args.workers} worker(s) in {elapsed:.2f} s"
    )
    print("sandbox reports:")
    for report in reports:
        print("  " + report.describe())
    bad = [job for job in jobs if job.error or job.digest != job.expected]
    if bad:
        print(f"{len(bad)} file(s) failed or did not match", file=sys.stderr)
    return 1 if bad else 0
