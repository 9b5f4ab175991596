"""The file broker: the parent opens files for a worker, strictly beneath a rule.

Most tests call :meth:`FileBroker.open` directly (no process), once with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` and once with the
component-by-component ``O_NOFOLLOW`` walk used on kernels without
``openat2``.  The protocol is tested in-process over a real channel pair,
and end to end through a worker running ``trio_mojo._examples:broker_reader``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from _fds import open_fds

from trio_mojo import (
    BrokerClient,
    BrokerError,
    Channel,
    DisconnectedError,
    FileAccess,
    FileBroker,
    Handle,
    MalformedMessageError,
    Message,
    SandboxPolicy,
    Worker,
    WorkerError,
    channel_pair,
    current_broker,
    open_channel,
    open_worker,
)
from trio_mojo._workers import _broker

SECRET = b"outside every rule"
ALLOWED = b"allowed content"


@attrs.frozen
class Tree:
    """A directory layout with a read-only root, a read-write root and traps."""

    base: Path
    ro: Path
    rw: Path
    secret: Path

    def broker(self) -> FileBroker:
        return FileBroker(
            [FileAccess.read_only(self.ro), FileAccess.read_write(self.rw)]
        )


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    base = tmp_path.resolve()
    ro, rw = base / "ro", base / "rw"
    for directory in (ro, ro / "sub", rw, base / "outside", base / "ro-sibling"):
        directory.mkdir()
    secret = base / "secret.txt"
    secret.write_bytes(SECRET)
    (base / "outside" / "x.txt").write_bytes(SECRET)
    (base / "ro-sibling" / "file.txt").write_bytes(SECRET)
    (ro / "file.txt").write_bytes(ALLOWED)
    (ro / "sub" / "nested.txt").write_bytes(b"nested")
    (ro / "link-out").symlink_to(secret)
    (ro / "link-in").symlink_to(ro / "file.txt")
    (ro / "dir-link").symlink_to(base / "outside")
    (rw / "existing.txt").write_bytes(b"0123456789")
    (rw / "link-out").symlink_to(secret)
    (rw / "dangling").symlink_to(base / "created-through-a-link")
    os.mkfifo(ro / "fifo")
    os.mkfifo(rw / "fifo")
    return Tree(base, ro, rw, secret)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each way of resolving a path beneath a root."""
    if request.param == "walk":
        monkeypatch.setitem(_broker._openat2_state, "works", False)
    else:
        root = os.open("/", os.O_PATH | os.O_CLOEXEC)
        try:
            probe = _broker._openat2(root, b".", os.O_PATH | os.O_CLOEXEC)
        finally:
            os.close(root)
        if probe is None:
            pytest.skip("this kernel has no openat2")
        os.close(probe)
    return str(request.param)


def _open(broker: FileBroker, path: Path | str, mode: str = "r") -> int:
    return broker.open(os.fsencode(path), mode)


def _refusal(broker: FileBroker, path: Path | str, mode: str = "r") -> int:
    """Open in a thread (a hang fails the test instead of stalling it)."""
    result: list[BaseException | int] = []
    thread = threading.Thread(
        target=lambda: result.append(_catch(broker, path, mode)), daemon=True
    )
    thread.start()
    thread.join(10)
    assert result, f"opening {path} hung"
    (outcome,) = result
    if isinstance(outcome, int):
        os.close(outcome)
        pytest.fail(f"{path} ({mode}) was served")
    assert isinstance(outcome, BrokerError), outcome
    assert outcome.errno is not None
    return outcome.errno


def _catch(broker: FileBroker, path: Path | str, mode: str) -> BaseException | int:
    try:
        return _open(broker, path, mode)
    except BaseException as exc:  # handed to the test thread
        return exc


# ----------------------------------------------------------------------
# FileBroker.open: what is served


def test_serves_a_file_under_a_read_only_rule(tree: Tree, resolver: str) -> None:
    broker = tree.broker()
    cases: list[tuple[Path | str, bytes]] = [
        (tree.ro / "file.txt", ALLOWED),
        (tree.ro / "sub" / "nested.txt", b"nested"),
        (f"{tree.ro}/./sub//nested.txt", b"nested"),
    ]
    for path, content in cases:
        fd = _open(broker, path)
        try:
            assert os.read(fd, 100) == content
            assert not os.get_inheritable(fd)  # O_CLOEXEC
            assert os.get_blocking(fd)  # opened O_NONBLOCK, handed over blocking
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        finally:
            os.close(fd)


def test_dotdot_that_stays_beneath_the_root(tree: Tree, resolver: str) -> None:
    """openat2 allows it; the fallback walk refuses every ``..`` (documented)."""
    path = f"{tree.ro}/sub/../file.txt"
    if resolver == "walk":
        assert _refusal(tree.broker(), path) == errno.EXDEV
        return
    fd = _open(tree.broker(), path)
    try:
        assert os.read(fd, 100) == ALLOWED
    finally:
        os.close(fd)


def test_a_read_write_rule_creates_appends_and_updates(
    tree: Tree, resolver: str
) -> None:
    broker = tree.broker()
    created = tree.rw / "new.txt"
    fd = _open(broker, created, "w")
    try:
        os.write(fd, b"written")
    finally:
        os.close(fd)
    assert created.read_bytes() == b"written"
    assert stat.S_IMODE(created.stat().st_mode) & 0o077 == 0  # private by default
    fd = _open(broker, created, "a")
    try:
        os.write(fd, b" and appended")
    finally:
        os.close(fd)
    fd = _open(broker, tree.rw / "existing.txt", "r+")
    try:
        assert os.read(fd, 4) == b"0123"
        os.write(fd, b"xx")
    finally:
        os.close(fd)
    assert created.read_bytes() == b"written and appended"
    assert (tree.rw / "existing.txt").read_bytes() == b"0123xx6789"


def test_a_rule_can_name_a_single_file(tree: Tree, resolver: str) -> None:
    broker = FileBroker([FileAccess.read_only(tree.secret)])
    fd = _open(broker, tree.secret)
    try:
        assert os.read(fd, 100) == SECRET
    finally:
        os.close(fd)
    assert _refusal(broker, f"{tree.secret}/more") == errno.ENOTDIR
    assert _refusal(broker, tree.ro / "file.txt") == errno.EACCES


# ----------------------------------------------------------------------
# FileBroker.open: what is refused


ESCAPE = {errno.EXDEV, errno.ELOOP}


@pytest.mark.parametrize(
    ("relative", "mode", "expected"),
    [
        pytest.param("ro/../secret.txt", "r", ESCAPE, id="dotdot"),
        pytest.param("ro/sub/../../secret.txt", "r", ESCAPE, id="dotdot-deeper"),
        pytest.param("ro/link-out", "r", {errno.ELOOP}, id="symlink-to-outside"),
        pytest.param("ro/link-in", "r", {errno.ELOOP}, id="symlink-inside"),
        pytest.param(
            "ro/dir-link/x.txt", "r", {errno.ELOOP, errno.ENOTDIR}, id="symlinked-dir"
        ),
        pytest.param("secret.txt", "r", {errno.EACCES}, id="absolute-outside"),
        pytest.param("ro-sibling/file.txt", "r", {errno.EACCES}, id="prefix-sibling"),
        pytest.param("rw/../secret.txt", "w", ESCAPE, id="dotdot-write"),
        pytest.param("rw/link-out", "w", {errno.ELOOP}, id="write-through-symlink"),
        pytest.param("rw/dangling", "w", {errno.ELOOP}, id="create-through-symlink"),
        pytest.param("ro/missing.txt", "r", {errno.ENOENT}, id="missing"),
        pytest.param("ro/fifo", "r", {errno.EACCES}, id="fifo-read"),
        pytest.param("rw/fifo", "w", {errno.EACCES}, id="fifo-write"),
        pytest.param("ro/sub", "r", {errno.EACCES}, id="directory"),
        pytest.param("ro", "r", {errno.EACCES}, id="the-root-itself"),
        pytest.param("ro/.", "r", {errno.EACCES}, id="the-root-as-dot"),
        pytest.param("rw/.", "w", {errno.EACCES}, id="the-root-for-writing"),
    ],
)
def test_refuses(
    tree: Tree, resolver: str, relative: str, mode: str, expected: set[int]
) -> None:
    assert _refusal(tree.broker(), f"{tree.base}/{relative}", mode) in expected
    assert tree.secret.read_bytes() == SECRET
    assert not (tree.base / "created-through-a-link").exists()


@pytest.mark.parametrize("mode", ["w", "a", "r+"])
def test_refuses_writing_under_a_read_only_rule(
    tree: Tree, resolver: str, mode: str
) -> None:
    target = tree.ro / "file.txt"
    assert _refusal(tree.broker(), target, mode) == errno.EACCES
    assert target.read_bytes() == ALLOWED  # not truncated on the way
    assert _refusal(tree.broker(), tree.ro / "new.txt", mode) == errno.EACCES
    assert not (tree.ro / "new.txt").exists()


@pytest.mark.parametrize("path", [b"", b"relative/file.txt", b"ro/file.txt", b"./x"])
def test_refuses_relative_paths(tree: Tree, path: bytes) -> None:
    with pytest.raises(BrokerError, match="only serves absolute paths") as info:
        tree.broker().open(path, "r")
    assert info.value.errno == errno.EACCES


def test_refuses_a_path_with_a_nul_byte(tree: Tree, resolver: str) -> None:
    # The kernel would see only the part before the NUL: another file than
    # the one the rules were checked against.
    path = os.fsencode(tree.ro / "file.txt") + b"\0/../../secret.txt"
    with pytest.raises(BrokerError) as info:
        tree.broker().open(path, "r")
    assert info.value.errno == errno.EINVAL


def test_rules_are_checked_when_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="absolute path"):
        FileAccess.read_only("relative/dir")
    with pytest.raises(ValueError, match="absolute path"):
        FileAccess("relative")
    missing = tmp_path / "no such dir"
    for make in (FileAccess.read_only, FileAccess.read_write, FileAccess):
        with pytest.raises(FileNotFoundError) as info:
            make(missing)
        assert str(info.value) == (
            f"[Errno 2] a FileAccess root must exist, and this one does not: "
            f"{str(missing)!r}"
        )
    (tmp_path / "dangling").symlink_to(missing)
    with pytest.raises(FileNotFoundError, match="must exist"):
        FileAccess.read_only(tmp_path / "dangling")
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert FileAccess.read_only(tmp_path / "alias").root == str(
        (tmp_path / "real").resolve()
    )
    with pytest.raises(TypeError, match="FileAccess rules"):
        FileBroker(["/tmp"])  # type: ignore[list-item]


def test_current_broker_outside_a_worker() -> None:
    with pytest.raises(RuntimeError, match="no file broker"):
        current_broker()


# ----------------------------------------------------------------------
# The protocol, in this process


@asynccontextmanager
async def _serving(
    broker: FileBroker,
) -> AsyncIterator[tuple[BrokerClient, Channel, trio.Nursery]]:
    """A broker serving on one end of a channel pair; a client on the other."""
    server_end, client_end = channel_pair()
    async with (
        open_channel(server_end) as server,
        open_channel(client_end) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(broker.serve, server)
        yield BrokerClient(client), client, nursery
        await client.aclose()  # the broker sees end of channel and returns


async def test_client_gets_files_and_refusals(tree: Tree) -> None:
    broker = tree.broker()
    async with _serving(broker) as (client, _, _):
        with await client.open(tree.ro / "file.txt") as handle:
            assert os.read(handle.fileno(), 100) == ALLOWED
        with pytest.raises(BrokerError) as info:
            await client.open(f"{tree.ro}/../secret.txt")
        assert info.value.errno == errno.EXDEV
        assert info.value.filename == f"{tree.ro}/../secret.txt"
        assert "escapes" in str(info.value)
        with await client.open(tree.rw / "made.txt", "w") as handle:
            os.write(handle.fileno(), b"made")
    assert (tree.rw / "made.txt").read_bytes() == b"made"
    assert (broker.served, broker.refused) == (2, 1)


@pytest.mark.parametrize(
    "payload",
    [b"", b"OPEN", b"OPEN\x00", b"OPEN\x09/x", b"SHUT\x00/x", b"OPEN\x00/a\0b"],
)
async def test_malformed_requests_get_einval(tree: Tree, payload: bytes) -> None:
    broker = tree.broker()
    async with _serving(broker) as (client, channel, _):
        await channel.send(Message(payload))
        with await channel.receive() as reply:
            assert reply.payload.startswith(b"ER" + errno.EINVAL.to_bytes(4, "little"))
            assert reply.handles == ()
        with await client.open(tree.ro / "file.txt"):  # and it keeps serving
            pass


async def test_a_cancelled_request_does_not_shift_the_replies(tree: Tree) -> None:
    """A reply that arrives after its request was cancelled is discarded."""
    gate = threading.Event()
    entered = trio.Event()
    token = trio.lowlevel.current_trio_token()

    class SlowBroker(FileBroker):
        def open(self, path: bytes, mode: str) -> int:
            if path.endswith(b"nested.txt"):
                trio.from_thread.run_sync(entered.set, trio_token=token)
                gate.wait(10)
            return super().open(path, mode)

    async with _serving(SlowBroker(tree.broker().rules)) as (client, _, _):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.open, tree.ro / "sub" / "nested.txt")
                await entered.wait()  # sent, and the broker is opening it
                scope.cancel()  # the client stops waiting for that reply
        gate.set()
        with await client.open(tree.ro / "file.txt") as handle:
            assert os.read(handle.fileno(), 100) == ALLOWED


class GatedBroker(FileBroker):
    """A broker whose opens wait in their thread until released: a slow or
    dead file system.  ``entered`` is set once an open waits."""

    def __init__(self, tree: Tree, hold_for: float) -> None:
        super().__init__(tree.broker().rules)
        self.entered = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._gate = threading.Event()
        self._opened = threading.Event()  # the held open has returned
        self._hold_for = hold_for

    def open(self, path: bytes, mode: str) -> int:
        trio.from_thread.run_sync(self.entered.set, trio_token=self._token)
        self._gate.wait(self._hold_for)
        try:
            return super().open(path, mode)
        finally:
            self._opened.set()

    async def release(self, baseline: set[int]) -> None:
        """Let the held open finish, then wait until its fd is closed.

        The fd is closed by a thread Trio no longer follows: nothing to wait
        on but the fds.  Only once the open has returned is its fd there to
        be closed (waiting for the fds alone could end before the thread
        even opened the file).
        """
        self._gate.set()
        with trio.fail_after(10):
            while not self._opened.is_set():  # noqa: ASYNC110
                await trio.sleep(0.01)
            while open_fds() - baseline:  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_cancelling_the_broker_mid_open_leaks_nothing(tree: Tree) -> None:
    baseline = open_fds()
    broker = GatedBroker(tree, hold_for=10)
    server_end, client_end = channel_pair()
    async with open_channel(server_end) as server, open_channel(client_end) as client:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker.serve, server)
                await client.send(
                    Message(_broker.encode_request(tree.ro / "file.txt", "r"))
                )
                await broker.entered.wait()
                scope.cancel()  # the open is abandoned, its thread still waits
        assert broker.served == 0
    await broker.release(baseline)  # the open finishes; its thread closes the fd


async def test_an_open_that_hangs_never_holds_up_the_broker_s_end(tree: Tree) -> None:
    """A dead network file system: the open never returns while we wait."""
    baseline = open_fds()
    broker = GatedBroker(tree, hold_for=30)
    with trio.fail_after(5):  # not the 30 s the open hangs
        async with _serving(broker) as (client, _, nursery):
            nursery.start_soon(client.open, tree.ro / "file.txt")
            await broker.entered.wait()
            nursery.cancel_scope.cancel()
    assert broker.served == 0
    await broker.release(baseline)


async def test_the_broker_never_waits_for_trio_s_shared_thread_limiter(
    tree: Tree,
) -> None:
    shared = trio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(int(shared.total_tokens))]
    for borrower in borrowers:
        await shared.acquire_on_behalf_of(borrower)
    try:
        async with _serving(tree.broker()) as (client, _, _):
            with trio.fail_after(5):
                handle = await client.open(tree.ro / "file.txt")
            with handle:
                assert os.read(handle.fileno(), 100) == ALLOWED
    finally:
        for borrower in borrowers:
            shared.release_on_behalf_of(borrower)


def test_the_request_rate_is_a_token_bucket_of_one_second() -> None:
    rate = _broker.RequestRate(10.0, now=100.0)
    assert [rate.delay(100.0) for _ in range(10)] == [0.0] * 10  # the burst
    assert rate.delay(100.0) == pytest.approx(0.1)
    assert rate.delay(100.1) == pytest.approx(0.1)  # still one in debt
    assert rate.delay(105.0) == 0.0  # refilled, to the burst only
    assert [rate.delay(105.0) for _ in range(9)] == [0.0] * 9
    assert rate.delay(105.0) > 0
    with pytest.raises(ValueError, match="must be > 0"):
        _broker.RequestRate(0.0, now=0.0)


async def test_a_broker_serves_no_faster_than_its_rate(tree: Tree) -> None:
    broker = FileBroker(tree.broker().rules, requests_per_second=20.0)
    async with _serving(broker) as (client, _, _):
        start = trio.current_time()
        for _ in range(30):  # 20 at once, then 10 at 20 a second
            (await client.open(tree.ro / "file.txt")).close()
        elapsed = trio.current_time() - start
    assert elapsed >= 0.45


# ----------------------------------------------------------------------
# End to end, through a worker


async def test_broker_end_to_end_through_a_worker(tree: Tree) -> None:
    async def ask(channel: Channel, request: str) -> bytes:
        await channel.send(Message(request.encode()))
        with await channel.receive() as reply:
            return reply.payload

    async with open_worker(
        "trio_mojo._examples:broker_reader",
        sandbox=SandboxPolicy.basic(),
        file_access=[FileAccess.read_only(tree.ro), FileAccess.read_write(tree.rw)],
    ) as worker:
        channel = worker.channel
        assert await ask(channel, f"r {tree.ro}/file.txt") == b"ok " + ALLOWED
        refusals = {
            f"r {tree.ro}/../secret.txt": errno.EXDEV,
            f"r {tree.ro}/link-out": errno.ELOOP,
            f"r {tree.secret}": errno.EACCES,
            f"w {tree.ro}/file.txt": errno.EACCES,
            f"r {tree.ro}/fifo": errno.EACCES,
            "r relative/path": errno.EACCES,
            # The refusal quotes the path: a long unprintable one must still
            # fit in a reply (it used to break the broker's channel limit).
            "r /" + "\x01" * 4000: errno.EACCES,
        }
        for request, code in refusals.items():
            reply = await ask(channel, request)
            assert reply.startswith(f"refused {code} ".encode()), (request, reply)
        # Both processes kept going: allowed requests still succeed.
        assert await ask(channel, f"w {tree.rw}/out.txt") == b"ok"
        assert await ask(channel, f"r {tree.rw}/out.txt") == b"ok written by worker"
        assert worker.broker is not None
        assert (worker.broker.served, worker.broker.refused) == (3, len(refusals))
    assert worker.returncode == 0
    assert (tree.rw / "out.txt").read_bytes() == b"written by worker"
    assert tree.ro.joinpath("file.txt").read_bytes() == ALLOWED


async def test_open_worker_sets_the_rate_of_its_broker(tree: Tree) -> None:
    with pytest.raises(ValueError, match="file_requests_per_second=0 must be > 0"):
        async with open_worker(
            "trio_mojo._examples:broker_reader",
            sandbox=SandboxPolicy.basic(),
            file_access=FileAccess.read_only(tree.ro),
            file_requests_per_second=0,
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    async with open_worker(
        "trio_mojo._examples:broker_reader",
        sandbox=SandboxPolicy.basic(),
        file_access=FileAccess.read_only(tree.ro),
        file_requests_per_second=20.0,
    ) as worker:
        assert worker.broker is not None
        assert worker.broker.requests_per_second == 20.0
        start = trio.current_time()
        for _ in range(30):  # 20 at once, then 10 at 20 a second
            await worker.channel.send(Message(f"r {tree.ro}/file.txt".encode()))
            assert (await worker.channel.receive()).payload == b"ok " + ALLOWED
        assert trio.current_time() - start >= 0.45


async def test_a_worker_without_file_access_has_no_broker(tree: Tree) -> None:
    async def run() -> None:
        async with open_worker(
            "trio_mojo._examples:broker_reader", sandbox=SandboxPolicy.basic()
        ) as worker:
            await worker.channel.send(Message(f"r {tree.ro}/file.txt".encode()))
            await worker.channel.receive()

    with pytest.raises(WorkerError) as info:
        await run()
    assert "RuntimeError: no file broker" in info.value.stderr_tail


async def test_a_worker_breaking_the_broker_protocol_only_stops_the_broker(
    tmp_path: Path,
) -> None:
    from trio_mojo._workers._worker import _serve_broker

    broker = FileBroker([FileAccess.read_only(tmp_path)])
    parent_end, worker_end = channel_pair()
    async with open_channel(worker_end) as worker_side:
        r, w = os.pipe()
        os.close(w)
        # Requests never carry fds: this one is malformed on the parent's side.
        await worker_side.send(Message(b"OPEN\x00/x", (Handle(r),)))
        with trio.fail_after(5):
            await _serve_broker(broker, parent_end, trio.CancelScope())  # no raise
        assert isinstance(broker.error, MalformedMessageError)
        with pytest.raises((trio.EndOfChannel, DisconnectedError)), trio.fail_after(5):
            await worker_side.receive()


async def test_a_normal_exit_is_not_a_broker_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    caplog.set_level(logging.WARNING, logger="trio_mojo")
    async with open_worker(
        "trio_mojo._examples:broker_reader",
        sandbox=SandboxPolicy.none(i_understand_this_is_unsandboxed=True),
        file_access=FileAccess.read_only(tmp_path),
    ) as worker:
        await worker.channel.send(Message(f"r {tmp_path / 'f'}".encode()))
        assert (await worker.channel.receive()).payload == b"ok hello"
    assert worker.broker is not None
    assert worker.broker.error is None
    assert worker.broker.served == 1
    assert not [m for m in caplog.messages if "file broker" in m]


async def test_write_access_under_a_policy_that_forbids_writing_is_refused_upfront(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match="max_file_size=0"):
        async with open_worker(
            "trio_mojo._examples:broker_reader",
            sandbox=SandboxPolicy.strict(),
            file_access=[FileAccess.read_write(tmp_path)],
        ):
            pytest.fail("the block must not run")  # pragma: no cover
    # The same policy with a size limit lets the worker write through the broker.
    policy = attrs.evolve(SandboxPolicy.strict(), max_file_size=1 << 20)
    async with open_worker(
        "trio_mojo._examples:broker_reader",
        sandbox=policy,
        file_access=[FileAccess.read_write(tmp_path)],
    ) as worker:
        await worker.channel.send(Message(f"w {tmp_path / 'out'}".encode()))
        assert (await worker.channel.receive()).payload == b"ok"
    assert (tmp_path / "out").read_bytes() == b"written by worker"


# ----------------------------------------------------------------------
# A worker that floods the broker and never reads its replies


async def _flood_until_stalled(worker: Worker) -> int:
    """Let the worker flood until its sends stall; how many it sent."""
    last, stable = -1, 0
    with trio.fail_after(60):
        while stable < 3:
            await trio.sleep(0.1)
            await worker.channel.send(Message(b"count"))
            with await worker.channel.receive() as reply:
                sent = int(reply.payload)
            stable = stable + 1 if sent == last else 0
            last = sent
    return last


@pytest.mark.parametrize("run", range(5))
async def test_a_broker_flood_is_bounded_and_never_raises_on_exit(
    tmp_path: Path, run: int
) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    baseline = len(open_fds())
    async with open_worker(
        "trio_mojo._examples:flood_broker",
        sandbox=SandboxPolicy.strict(),
        file_access=FileAccess.read_only(tmp_path),
    ) as worker:
        await worker.channel.send(Message(str(tmp_path / "f").encode()))
        sent = await _flood_until_stalled(worker)
        held = len(open_fds()) - baseline
        assert worker.broker is not None
        served = worker.broker.served
        # Exit normally, every reply unread (the race that used to raise here).
        await worker.channel.send(Message(b"stop"))
    # The broker stopped serving after a few replies: a handful wait in its
    # send queue (our fd table), a few more in the kernel (its socket's
    # small send buffer); the worker's further requests just wait.
    assert held <= 16, f"the parent holds {held} extra fds during the flood"
    assert served <= 32, f"the broker opened {served} files for unread replies"
    assert sent > served
    assert worker.returncode == 0
