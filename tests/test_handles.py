"""Handle (``_handles.py``): one owned fd, closed exactly once."""

from __future__ import annotations

import enum
import errno
import gc
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from _core_support import file_identity
from _fds import fd_is_open

from trio_mojo import Handle
from trio_mojo._handles import adopt_all, close_all, close_fds, give_back, take_all


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        if fd_is_open(fd):
            os.close(fd)


def test_handle_owns_and_closes_its_fd(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    handle = Handle(r)
    assert handle.fileno() == r
    assert [handle.closed] == [False]  # (a list: mypy would narrow the property)
    handle.close()
    assert handle.closed
    assert not fd_is_open(r)


def test_close_is_idempotent_and_never_touches_a_reused_number(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    handle = Handle(r)
    handle.close()
    reused = os.dup(w)  # the lowest free number: very likely r again
    try:
        handle.close()
        handle.close()
        assert fd_is_open(reused)
    finally:
        os.close(reused)


def test_closed_handle_stores_minus_one(pipe: tuple[int, int]) -> None:
    handle = Handle(pipe[0])
    handle.close()
    assert handle._fd == -1


def test_fileno_of_a_closed_handle_raises(pipe: tuple[int, int]) -> None:
    handle = Handle(pipe[0])
    handle.close()
    with pytest.raises(ValueError, match="closed Handle"):
        handle.fileno()


def test_detach_returns_the_fd_without_closing_it(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    handle = Handle(r)
    assert handle.detach() == r
    assert handle.closed
    assert fd_is_open(r)  # the caller owns it again (the fixture closes it)
    handle.close()  # a no-op now
    assert fd_is_open(r)
    with pytest.raises(ValueError, match="closed Handle"):
        handle.detach()
    with pytest.raises(ValueError, match="closed Handle"):
        handle.fileno()


def test_context_manager_closes_on_exit(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with Handle(r) as handle:
        assert handle.fileno() == r
    assert handle.closed
    assert not fd_is_open(r)


def test_context_manager_closes_on_error(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with pytest.raises(KeyError), Handle(r):
        raise KeyError("boom")
    assert not fd_is_open(r)


def test_repr(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    handle = Handle(r)
    assert repr(handle) == f"<trio_mojo.Handle fd={r}>"
    handle.close()
    assert repr(handle) == "<trio_mojo.Handle closed>"


def test_garbage_collected_open_handle_closes_and_warns(
    pipe: tuple[int, int],
) -> None:
    r, _ = pipe
    with pytest.warns(ResourceWarning, match=rf"unclosed trio_mojo\.Handle fd={r}\b"):
        _drop_an_open_handle(r)
    assert not fd_is_open(r)


def _drop_an_open_handle(fd: int) -> None:
    Handle(fd)  # the last reference goes at once: __del__ runs here
    gc.collect()


def test_garbage_collected_closed_or_detached_handle_is_silent(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    closed = Handle(r)
    closed.close()
    detached = Handle(w)
    detached.detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del closed, detached
        gc.collect()
    assert [c for c in caught if issubclass(c.category, ResourceWarning)] == []
    assert fd_is_open(pipe[1])  # detached: still the caller's


class _FdNumber(enum.IntEnum):
    ZERO = 0


def test_int_subclasses_are_accepted_as_plain_ints(pipe: tuple[int, int]) -> None:
    class Fd(int):
        pass

    handle = Handle(Fd(pipe[0]))
    assert type(handle.fileno()) is int
    handle.detach()
    assert type(Handle(_FdNumber.ZERO).detach()) is int


@pytest.mark.parametrize("bad", ["3", 3.0, None, True])
def test_non_int_fds_are_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="Handle needs an int fd"):
        Handle(cast(int, bad))


def test_negative_fds_are_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative fd, got -1"):
        Handle(-1)


def test_a_handle_whose_constructor_failed_is_collected_quietly() -> None:
    # __del__ of the half-built object must not raise (it would be reported
    # as an unraisable exception) nor warn.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in ("3", -1):
            with pytest.raises((TypeError, ValueError)):
                Handle(cast(int, bad))
        gc.collect()
    assert caught == []


def test_dup_from_int_object_and_handle(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    with Handle.dup(r) as from_int:
        assert from_int.fileno() != r
        assert file_identity(from_int.fileno()) == file_identity(r)
        assert not os.get_inheritable(from_int.fileno())
        with Handle.dup(from_int) as from_handle:
            assert file_identity(from_handle.fileno()) == file_identity(r)
    assert fd_is_open(r)  # the original stays the caller's
    with open(r, closefd=False) as file_object, Handle.dup(file_object) as from_file:
        assert file_identity(from_file.fileno()) == file_identity(r)


def test_dup_of_a_bad_fd_raises(pipe: tuple[int, int]) -> None:
    handle = Handle(os.dup(pipe[0]))
    number = handle.fileno()
    handle.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        Handle.dup(number)


def test_open_is_close_on_exec(tmp_path: Path) -> None:
    path = tmp_path / "file.txt"
    path.write_bytes(b"content")
    with Handle.open(path) as handle:
        assert not os.get_inheritable(handle.fileno())
        assert os.read(handle.fileno(), 100) == b"content"
    with Handle.open(str(path), os.O_WRONLY | os.O_APPEND) as handle:
        os.write(handle.fileno(), b"!")
    assert path.read_bytes() == b"content!"


def test_close_all_closes_everything_and_reraises_the_first_error(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    good_first = Handle(os.dup(r))
    stolen = Handle(os.dup(r))
    good_last = Handle(os.dup(w))
    os.close(stolen.fileno())  # closed behind the handle's back: EBADF later
    with pytest.raises(OSError, match="Bad file descriptor"):
        close_all([good_first, stolen, good_last])
    assert good_first.closed
    assert stolen.closed
    assert good_last.closed


def test_close_all_of_nothing() -> None:
    close_all([])
    close_all(iter(()))


# ----------------------------------------------------------------------
# reopen(): a description of one's own


def _shares_description(first: int, second: int) -> bool:
    """True if changing ``first``'s O_NONBLOCK changes ``second``'s."""
    before = os.get_blocking(second)
    os.set_blocking(first, not os.get_blocking(first))
    changed = os.get_blocking(second) != before
    os.set_blocking(first, not os.get_blocking(first))
    return changed


@pytest.mark.parametrize("end", [0, 1], ids=["read end", "write end"])
def test_reopen_gives_a_pipe_end_a_description_of_its_own(
    pipe: tuple[int, int], end: int
) -> None:
    kept = pipe[end]  # the sender's copy
    os.set_blocking(kept, False)
    with Handle.dup(kept) as handle:
        shared_before = _shares_description(kept, handle.fileno())
        handle.reopen()
        assert shared_before
        assert not _shares_description(kept, handle.fileno())
        assert not os.get_blocking(handle.fileno())  # kept as it was
        assert os.get_inheritable(handle.fileno()) is False
        assert file_identity(handle.fileno()) == file_identity(kept)
        if end:
            os.write(handle.fileno(), b"through the new end")
            assert os.read(pipe[0], 100) == b"through the new end"
        else:
            os.write(pipe[1], b"to the new end")
            assert os.read(handle.fileno(), 100) == b"to the new end"


def test_reopen_keeps_a_blocking_description_blocking(pipe: tuple[int, int]) -> None:
    with Handle.dup(pipe[0]) as handle:
        handle.reopen()
        assert os.get_blocking(handle.fileno())


def test_reopen_of_a_regular_file_keeps_its_mode_and_starts_at_zero(
    tmp_path: Path,
) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    with Handle(fd) as handle:
        original = os.dup(fd)
        try:
            handle.reopen()
            assert not _shares_description(original, handle.fileno())
        finally:
            os.close(original)
        os.write(handle.fileno(), b"d")  # O_APPEND kept
        with pytest.raises(OSError, match="Bad file descriptor"):  # write-only
            os.read(handle.fileno(), 1)
    assert path.read_bytes() == b"abcd"


def test_reopen_refuses_fds_without_a_path_to_open_again() -> None:
    a, b = socket.socketpair()
    refused = [
        Handle(a.detach()),
        Handle(os.eventfd(0, os.EFD_CLOEXEC)),
        Handle(os.pidfd_open(os.getpid())),
        Handle.open("/dev/null"),
        Handle.open("/", os.O_RDONLY | os.O_DIRECTORY),
    ]
    b.close()
    try:
        for handle in refused:
            number = handle.fileno()
            with pytest.raises(ValueError, match="can be reopened"):
                handle.reopen()
            assert handle.fileno() == number  # untouched, still owned
    finally:
        close_all(refused)


def test_reopen_refuses_an_o_path_fifo_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with Handle.open(fifo, os.O_PATH) as handle:
        with pytest.raises(ValueError, match="O_PATH"):
            handle.reopen()
        # Nobody opened the FIFO for reading: a non-blocking writer is refused.
        with pytest.raises(OSError, match="No such device or address"):
            os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)


def test_reopen_of_a_fifo_write_end_without_reader_fails_and_keeps_the_fd(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with Handle.open(fifo, os.O_WRONLY | os.O_NONBLOCK) as handle:
        os.close(reader)
        number = handle.fileno()
        with pytest.raises(OSError, match="No such device or address") as caught:
            handle.reopen()
        assert caught.value.errno == errno.ENXIO
        assert handle.fileno() == number


def test_reopen_of_a_closed_handle_raises(pipe: tuple[int, int]) -> None:
    handle = Handle.dup(pipe[0])
    handle.close()
    with pytest.raises(ValueError, match="closed"):
        handle.reopen()


def test_adopt_all_owns_what_the_kernel_handed_over(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    numbers = [os.dup(r), os.dup(r)]
    handles = adopt_all(numbers)
    assert [type(h) for h in handles] == [Handle, Handle]
    assert [h.fileno() for h in handles] == numbers
    close_all(handles)
    assert not any(fd_is_open(fd) for fd in numbers)
    assert adopt_all([]) == []


def test_close_fds_closes_every_number_even_after_a_failure(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    first, second = os.dup(r), os.dup(w)
    os.close(first)  # closing it again fails (EBADF) ...
    with pytest.raises(OSError, match="Bad file descriptor") as info:
        close_fds([first, second])
    assert info.value.errno == errno.EBADF
    assert not fd_is_open(second)  # ... and the next one is closed all the same
    close_fds([])


def test_take_all_moves_the_fds_out_of_the_handles(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    given = (Handle(os.dup(r)), Handle(os.dup(r)))
    numbers = [h.fileno() for h in given]
    taken = take_all(given)
    assert taken == numbers  # bare numbers: no second Handle per fd
    assert all(h.closed for h in given)  # the caller's read as closed
    given[0].close()  # does nothing: the fd is not the caller's any more
    assert all(fd_is_open(fd) for fd in numbers)
    with pytest.raises(ValueError, match="already given to send"):
        take_all(given[:1])  # taking it again: the mistake is caught here
    give_back(given, taken)  # a cancelled send: the caller's again
    assert [h.fileno() for h in given] == numbers
    close_all(given)
    assert not any(fd_is_open(fd) for fd in numbers)
    assert take_all(()) == []


def test_take_all_refuses_closed_and_repeated_handles_and_changes_nothing(
    pipe: tuple[int, int],
) -> None:
    r, _ = pipe
    one, two = Handle(os.dup(r)), Handle(os.dup(r))
    numbers = [one.fileno(), two.fileno()]
    with pytest.raises(ValueError, match="appears twice"):
        take_all((one, two, one))
    assert [one.fileno(), two.fileno()] == numbers
    two.close()
    with pytest.raises(ValueError, match="closed handle"):
        take_all((one, two))
    assert one.fileno() == numbers[0]
    one.close()
