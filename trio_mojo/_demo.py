"""``python -m trio_mojo demo``: hash files in sandboxed workers that cannot open them.

The parent finds the files, opens each one and hands it to a pool of
sandboxed workers (:func:`open_worker_pool`, whose workers are forked from
a zygote: the progress line says so) as an fd; a worker reads the
fd, computes SHA-256 and answers with the digest.  The parent checks each
digest against :mod:`hashlib` run on its own descriptor of the same file,
and prints a table, what it could not hash, and the workers' sandbox
reports.

What it does with paths:

* a **regular file** is hashed; a directory is walked (symbolic links to
  directories are not followed);
* anything else (a FIFO, a socket, a device) is **skipped** without being
  opened for reading in a way that could block: the type comes from
  ``os.stat``, and every open uses ``O_NONBLOCK`` and is checked again
  with ``fstat``, so a path swapped for a FIFO cannot hang it;
* a path that does not exist is **missing**; one that cannot be opened or
  read (or a directory that cannot be listed) is **unreadable**.

Exit status: 0 when every file found was hashed and matched; 1 when
something was missing, unreadable or wrong, or nothing was hashed at all;
130 on Ctrl-C (quietly, after killing the workers).

Protocol on each worker's channel (payloads are bytes, no pickle; one
reply per request, in order, so no job id is needed):

* parent -> worker: an empty payload with one handle, the open file;
* worker -> parent: ``0x00 | size (u64 LE) | sha256 (32 bytes)``, or
  ``0x01 | errno (u32 LE) | reason (UTF-8)`` if reading failed.
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import os
import stat
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final, TextIO

import attrs
import trio

from ._channel import Channel
from ._core._message import Message
from ._errors import SandboxUnavailableError, WorkerError
from ._handles import Handle
from ._sandbox import SandboxPolicy, SandboxReport
from ._workers._pool import WorkerPool, open_worker_pool
from ._workers._serve import serve

__all__ = ["hash_files", "main"]

_DIGEST: Final = struct.Struct("<BQ32s")
_FAILED: Final = struct.Struct("<BI")
_CHUNK: Final = 1 << 20
_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_INTERRUPTED: Final = 130


def _sha256(fd: int, *, positional: bool) -> tuple[int, bytes]:
    """Hash what ``fd`` holds; ``positional`` reads with ``pread`` (no offset)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := (os.pread(fd, _CHUNK, size) if positional else os.read(fd, _CHUNK)):
        digest.update(chunk)
        size += len(chunk)
        trio.from_thread.check_cancelled()
    return size, digest.digest()


async def hash_files(channel: Channel) -> None:
    """Worker target: for each request's fd, reply with its size and SHA-256."""

    async def handle(request: Message) -> bytes:
        if len(request.handles) != 1:
            raise ValueError("demo protocol: expected one fd per request")
        try:
            size, digest = await trio.to_thread.run_sync(
                lambda: _sha256(request.handles[0].fileno(), positional=False)
            )
        except OSError as exc:
            reason = (exc.strerror or str(exc)).encode()
            return _FAILED.pack(1, exc.errno or 0) + reason
        return _DIGEST.pack(0, size, digest)

    await serve(channel, handle)


@attrs.define
class _Job:
    path: Path
    size: int = 0
    digest: str = ""
    expected: str = ""
    error: str = ""


@attrs.define
class _Found:
    """What the walk found: files to hash, and paths it could not use."""

    files: list[Path] = attrs.Factory(list)
    missing: list[tuple[Path, str]] = attrs.Factory(list)
    unreadable: list[tuple[Path, str]] = attrs.Factory(list)
    skipped: list[tuple[Path, str]] = attrs.Factory(list)


_KINDS: Final = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symbolic link",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _sort_out(path: Path, found: _Found, *, top_level: bool) -> None:
    """Put ``path`` where it belongs; walk it if it is a directory."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        found.missing.append((path, "no such file or directory"))
        return
    except OSError as exc:
        found.unreadable.append((path, exc.strerror or str(exc)))
        return
    if stat.S_ISREG(mode):
        found.files.append(path)
    elif stat.S_ISDIR(mode) and (top_level or not path.is_symlink()):
        _walk(path, found)
    elif stat.S_ISDIR(mode):
        found.skipped.append((path, "a symbolic link to a directory"))
    else:
        found.skipped.append((path, _kind(mode)))


def _walk(directory: Path, found: _Found) -> None:
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as exc:
        found.unreadable.append((directory, exc.strerror or str(exc)))
        return
    for entry in entries:
        _sort_out(Path(entry.path), found, top_level=False)


def _find(paths: Sequence[str]) -> _Found:
    found = _Found()
    if not paths:
        package = Path(__file__).resolve().parent
        found.files = sorted(
            p
            for p in package.iterdir()
            if p.is_file() and p.suffix in (".py", ".typed")
        )
        return found
    for name in paths:
        _sort_out(Path(name), found, top_level=True)
    return found


class _Progress:
    """One line on stderr: rewritten in place on a terminal, else every 0.5 s."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._next = 0.0
        self._shown = False

    def show(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
            self._shown = True
        elif force or now >= self._next:
            self._next = now + 0.5
            self._stream.write(text + "\n")
        self._stream.flush()

    def end(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()
            self._shown = False


async def _tick_while_starting(
    progress: _Progress, workers: int, scope: trio.CancelScope
) -> None:
    started = time.monotonic()
    text = f"starting a zygote and {workers} sandboxed worker(s) forked from it"
    progress.show(text + "...", force=True)
    with scope:
        while True:
            await trio.sleep(0.25)
            progress.show(f"{text}... {time.monotonic() - started:.1f} s")


def _open_regular(job: _Job, unusable: _Found) -> Handle | None:
    """Open ``job.path`` without blocking; ``None`` (and why) if unusable."""
    try:
        fd = os.open(job.path, _OPEN_FLAGS)
    except FileNotFoundError:
        unusable.missing.append((job.path, "vanished before it was opened"))
        return None
    except OSError as exc:
        unusable.unreadable.append((job.path, exc.strerror or str(exc)))
        return None
    handle = Handle(fd)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        unusable.skipped.append((job.path, _kind(mode) + " (replaced after the walk)"))
        return None
    return handle


async def _check(job: _Job, handle: Handle, limiter: trio.CapacityLimiter) -> None:
    """The parent's own digest of the same file, read with ``pread``."""
    with handle:
        _, digest = await trio.to_thread.run_sync(
            lambda: _sha256(handle.fileno(), positional=True), limiter=limiter
        )
    job.expected = digest.hex()


async def _hash_all(
    pool: WorkerPool, jobs: list[_Job], found: _Found, progress: _Progress
) -> list[_Job]:
    """Hash every job through the pool; return the ones that were hashed."""
    sent: collections.deque[tuple[_Job, Handle]] = collections.deque()

    def requests() -> Iterator[Message]:
        for job in jobs:
            handle = _open_regular(job, found)
            if handle is None:
                continue
            sent.append((job, handle))
            yield Message(b"", [Handle(os.dup(handle.fileno()))])

    hashed: list[_Job] = []
    limiter = trio.CapacityLimiter(max(1, len(pool.workers)))
    try:
        async with trio.open_nursery() as checks, pool.map(requests()) as replies:
            while True:
                try:
                    reply = await replies.__anext__()
                except StopAsyncIteration:
                    break
                except WorkerError as exc:
                    job, handle = sent.popleft()
                    handle.close()
                    job.error = f"worker failed: {str(exc).splitlines()[0]}"
                    found.unreadable.append((job.path, job.error))
                    continue
                job, handle = sent.popleft()
                with reply:
                    if reply.payload[:1] == b"\x00":
                        _, job.size, digest = _DIGEST.unpack(reply.payload)
                        job.digest = digest.hex()
                        hashed.append(job)
                        checks.start_soon(_check, job, handle, limiter)
                    else:
                        handle.close()
                        _, code = _FAILED.unpack_from(reply.payload)
                        reason = reply.payload[_FAILED.size :].decode(errors="replace")
                        name = errno.errorcode.get(code, str(code))
                        found.unreadable.append(
                            (job.path, f"read failed: {name} {reason}")
                        )
                progress.show(f"[{len(hashed)}/{len(jobs)}] hashing {job.path.name}")
        progress.show(f"[{len(hashed)}/{len(jobs)}] hashed", force=True)
    finally:
        for _, handle in sent:
            handle.close()
    return hashed


async def _run(
    found: _Found, workers: int, policy: SandboxPolicy
) -> tuple[list[_Job], list[SandboxReport], float]:
    progress = _Progress(sys.stderr)
    jobs = [_Job(path) for path in found.files]
    try:
        async with trio.open_nursery() as nursery:
            ticker = trio.CancelScope()
            nursery.start_soon(_tick_while_starting, progress, workers, ticker)
            async with open_worker_pool(
                "trio_mojo._demo:hash_files", workers=workers, sandbox=policy
            ) as pool:
                ticker.cancel()
                reports = [worker.sandbox_report for worker in pool.workers]
                zygote = pool.zygote  # the pool's default: always there
                forked = (
                    "" if zygote is None else f" forked from zygote pid {zygote.pid}"
                )
                progress.show(
                    f"{workers} worker(s){forked} ready; hashing {len(jobs)} file(s)",
                    force=True,
                )
                started = time.monotonic()
                hashed = await _hash_all(pool, jobs, found, progress)
    finally:
        progress.end()
    return hashed, reports, time.monotonic() - started


def _print_table(jobs: list[_Job]) -> None:
    width = max([len(str(job.path)) for job in jobs] + [4])
    print(f"{'file':<{width}}  {'size':>10}  {'sha256':<64}  ok")
    for job in jobs:
        ok = "yes" if job.digest == job.expected else "NO"
        print(f"{job.path!s:<{width}}  {job.size:>10}  {job.digest}  {ok}")


def _print_problems(title: str, entries: list[tuple[Path, str]]) -> None:
    if entries:
        print(f"\n{title} ({len(entries)}):")
        for path, reason in entries:
            print(f"  {path}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0: every file found was hashed and matched)."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo demo",
        description=(
            "Hash files in a pool of sandboxed worker processes that cannot open them: "
            "the parent opens each file and passes it to a worker as a file descriptor "
            "over a trio_mojo channel; the worker returns its SHA-256, which the parent "
            "checks against hashlib.  Non-regular files (FIFOs, sockets, devices) are "
            "skipped; missing and unreadable paths are listed.  Exit status 0 when every "
            "file found was hashed and matched, 1 otherwise, 130 on Ctrl-C."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="files or directories to hash (default: the files of the installed trio_mojo)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes (default 2; never more than there are files)",
    )
    sandbox = parser.add_mutually_exclusive_group()
    sandbox.add_argument(
        "--strict",
        action="store_true",
        help="run the workers with SandboxPolicy.strict() (refuses to start on a "
        "machine that lacks one of its layers) instead of SandboxPolicy.basic()",
    )
    sandbox.add_argument(
        "--unsandboxed",
        action="store_true",
        help="run the workers with SandboxPolicy.none() instead of SandboxPolicy.basic()",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.unsandboxed:
        policy = SandboxPolicy.none(i_understand_this_is_unsandboxed=True)
    elif args.strict:
        policy = SandboxPolicy.strict()
    else:
        policy = SandboxPolicy.basic()
    try:
        return _main(args.paths, args.workers, policy)
    except (WorkerError, SandboxUnavailableError) as exc:
        print(f"demo: the workers could not start: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        if _only_interrupted(exc):
            return _INTERRUPTED
        raise


def _only_interrupted(exc: BaseException) -> bool:
    """True for Ctrl-C, also when nurseries wrapped it in exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        interrupts, rest = exc.split(KeyboardInterrupt)
        return interrupts is not None and rest is None
    return isinstance(exc, KeyboardInterrupt)


def _main(paths: Sequence[str], workers: int, policy: SandboxPolicy) -> int:
    found = _find(paths)
    workers = min(workers, len(found.files))
    hashed: list[_Job] = []
    reports: list[SandboxReport] = []
    elapsed = 0.0
    if workers:
        hashed, reports, elapsed = trio.run(
            _run,
            found,
            workers,
            policy,
            restrict_keyboard_interrupt_to_checkpoints=True,
        )
    if hashed:
        _print_table(hashed)
    _print_problems("missing", found.missing)
    _print_problems("unreadable", found.unreadable)
    _print_problems("skipped", found.skipped)
    print(
        f"\n{len(hashed)} file(s) hashed by {workers} worker(s) in {elapsed:.2f} s; "
        f"{len(found.missing)} missing, {len(found.unreadable)} unreadable, "
        f"{len(found.skipped)} skipped"
    )
    if reports:
        print("sandbox reports:")
        for report in reports:
            print("  " + report.describe())
    mismatched = [job for job in hashed if job.digest != job.expected]
    if mismatched:
        print(f"{len(mismatched)} digest(s) did not match hashlib", file=sys.stderr)
    if not hashed:
        print("nothing was hashed", file=sys.stderr)
    failed = mismatched or found.missing or found.unreadable or not hashed
    return 1 if failed else 0
