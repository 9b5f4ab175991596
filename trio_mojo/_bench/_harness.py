"""Processes: the driver starts a sender per run; the sender starts its receiver.

Driver side: :func:`run` starts ``python -m trio_mojo._bench._runner sender
SPEC`` in a new session (so a timeout can kill the sender *and* its
receiver) and parses the one JSON line it prints.  The driver itself never
runs an event loop.

Process side: :func:`process_main` plays one role.  The sender makes the
socket pair and the control pipe, starts the receiver with ``pass_fds``
(its socket named by ``--mojo-platform-channel-handle=N``), runs the
system's sender, collects the receiver's result from the pipe and checks
it: every message, payload byte and fd must have arrived, and nothing more
(the honesty checks).  With ``--profile`` each role runs under cProfile.
"""

from __future__ import annotations

import cProfile
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict
from types import ModuleType
from typing import Any, Final, TypeVar

from ._common import ControlReader, ControlWriter, ReceiverResult, RunSpec, SenderResult
from ._workloads import SYSTEMS

__all__ = ["RUNNER", "process_main", "run", "run_helper"]

RUNNER: Final = "trio_mojo._bench._runner"
CHANNEL_SWITCH: Final = "--mojo-platform-channel-handle"
CONTROL_SWITCH: Final = "--bench-control-fd"

_T = TypeVar("_T")


# ---------------------------------------------------------------- driver side


def _runner_command(*args: str) -> list[str]:
    return [sys.executable, "-m", RUNNER, *args]


def _communicate(command: list[str], timeout: float) -> tuple[int, str, str]:
    """Run ``command`` in its own session; kill the whole session on timeout."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            err += f"\n[bench] killed after a {timeout:.0f} s timeout"
            return -9, out, err
        return process.returncode, out, err


def _last_json_line(out: str) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return None


def run(spec: RunSpec, prefix: Sequence[str] = ()) -> dict[str, Any]:
    """Run one (system, workload, repetition); return the parsed record.

    The record has ``spec``, ``sender``, ``receiver`` and ``errors`` (empty
    when every honesty check passed).  ``prefix`` goes before the sender's
    command line (``valgrind ...``).
    """
    command = [*prefix, *_runner_command("sender", spec.to_json())]
    rc, out, err = _communicate(command, spec.timeout)
    record = _last_json_line(out)
    if record is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        return {
            "spec": asdict(spec),
            "sender": None,
            "receiver": None,
            "errors": [f"sender exited with {rc} without a result:\n{tail}"],
        }
    if rc != 0 and not record["errors"]:
        record["errors"].append(f"sender exited with {rc}")
    return record


def run_helper(args: list[str], timeout: float) -> dict[str, Any]:
    """Run a helper role (``idle``, ``spawn``) and return its JSON result."""
    rc, out, err = _communicate(_runner_command(*args), timeout)
    record = _last_json_line(out)
    if record is None or rc != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        return {"error": f"{args[0]} helper exited with {rc}:\n{tail}"}
    return record


# ---------------------------------------------------------------- process side


def _system_module(name: str) -> ModuleType:
    for system in SYSTEMS:
        if system.name == name:
            return importlib.import_module(f"trio_mojo._bench.{system.module}")
    raise ValueError(f"unknown system {name!r}")


def _profiled(
    spec: RunSpec, role: str, function: Callable[..., _T], *args: object
) -> _T:
    if not spec.profile_path:
        return function(*args)
    profile = cProfile.Profile()
    try:
        return profile.runcall(function, *args)
    finally:
        profile.dump_stats(f"{spec.profile_path}-{role}.prof")


def _switch_value(argv: list[str], switch: str) -> int:
    prefix = switch + "="
    for arg in argv:
        if arg.startswith(prefix):
            return int(arg[len(prefix) :])
    raise ValueError(f"missing {switch}=N")


def honesty_errors(
    spec: RunSpec, sent: SenderResult, received: ReceiverResult, returncode: int | None
) -> list[str]:
    """What the sender checks once the receiver reported (empty = honest)."""
    errors = []
    if returncode:
        errors.append(f"receiver exited with {returncode}")
    if received.error:
        errors.append(f"receiver: {received.error}")
    if spec.mode == "trickle":
        return errors
    expected = {
        "messages": spec.count,
        "payload_bytes": spec.total_bytes,
        "fds": spec.total_fds,
        "extra_messages": 0,
    }
    for key, want in expected.items():
        got = getattr(received, key)
        if got != want:
            errors.append(f"receiver counted {key}={got}, expected {want}")
    if spec.pingpong and len(sent.rtts_ns) != spec.count:
        errors.append(f"{len(sent.rtts_ns)} round trips timed, expected {spec.count}")
    if received.t_end <= sent.t0:
        errors.append("the receiver finished before the sender started")
    return errors


def _worker_process(spec: RunSpec) -> int:
    """A run whose peer is a sandboxed worker the system starts itself."""
    module = _system_module(spec.system)
    sent, received = _profiled(spec, "sender", module.worker_pingpong, spec)
    record = {
        "spec": asdict(spec),
        "sender": asdict(sent),
        "receiver": asdict(received),
        "errors": honesty_errors(spec, sent, received, None),
    }
    print(json.dumps(record), flush=True)
    return 1 if record["errors"] else 0


def _sender_process(spec: RunSpec) -> int:
    if spec.worker:
        return _worker_process(spec)
    module = _system_module(spec.system)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control_r, control_w = os.pipe()
    command = _runner_command(
        "receiver",
        spec.to_json(),
        f"{CONTROL_SWITCH}={control_w}",
        f"{CHANNEL_SWITCH}={theirs.fileno()}",
    )
    child = subprocess.Popen(
        command, pass_fds=(control_w, theirs.fileno()), stdout=subprocess.DEVNULL
    )
    theirs.close()
    os.close(control_w)
    control = ControlReader(control_r)
    try:
        sent: SenderResult = _profiled(
            spec, "sender", module.sender, spec, mine, control
        )
        received = control.result()
        returncode = child.wait(timeout=60)
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        mine.close()
    record = {
        "spec": asdict(spec),
        "sender": asdict(sent),
        "receiver": asdict(received),
        "errors": honesty_errors(spec, sent, received, returncode),
    }
    print(json.dumps(record), flush=True)
    return 1 if record["errors"] else 0


def run_forked(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` in this process with its receiver *forked* from it.

    The same sender and receiver as :func:`run`, whose receiver is a fresh
    interpreter: here the receiver is a copy of this one (``os.fork``
    before any event loop runs), so both share the pages of the
    interpreter's heap until they write them.  Returns the record as
    :func:`run` does.
    """
    module = _system_module(spec.system)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    control_r, control_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        status = 1
        try:
            mine.close()
            os.close(control_r)
            status = _receiver_process(
                spec,
                [
                    f"{CONTROL_SWITCH}={control_w}",
                    f"{CHANNEL_SWITCH}={theirs.detach()}",
                ],
            )
        finally:
            os._exit(status)
    theirs.close()
    os.close(control_w)
    control = ControlReader(control_r)
    try:
        sent: SenderResult = module.sender(spec, mine, control)
        received = control.result()
    finally:
        mine.close()
        _, status = os.waitpid(pid, 0)
    return {
        "spec": asdict(spec),
        "sender": asdict(sent),
        "receiver": asdict(received),
        "errors": honesty_errors(
            spec, sent, received, os.waitstatus_to_exitcode(status)
        ),
    }


def _receiver_process(spec: RunSpec, argv: list[str]) -> int:
    control = ControlWriter(_switch_value(argv, CONTROL_SWITCH))
    sock_fd = _switch_value(argv, CHANNEL_SWITCH)
    try:
        module = _system_module(spec.system)
        result: ReceiverResult = _profiled(
            spec, "receiver", module.receiver, spec, sock_fd, argv, control
        )
    except BaseException:
        traceback.print_exc()
        result = ReceiverResult(error=traceback.format_exc(limit=8))
    control.result(result)
    return 1 if result.error else 0


def process_main(argv: list[str]) -> int:
    """Entry point of the benchmark's child processes (see ``_runner``)."""
    role, *rest = argv
    if role == "sender":
        return _sender_process(RunSpec.from_json(rest[0]))
    if role == "receiver":
        return _receiver_process(RunSpec.from_json(rest[0]), rest[1:])
    if role in ("idle", "spawn", "forked"):
        from . import _extras

        result = _extras.helper_main(role, rest)
        print(json.dumps(result), flush=True)
        return 0
    raise SystemExit(f"unknown role {role!r}")
