"""Applying a policy, in the worker, after its imports and before its target."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from typing import Final

from . import _landlock, _namespaces, _seccomp
from ._policy import Requirement, SandboxPolicy
from ._report import SandboxReport

__all__ = ["apply_policy", "set_parent_death_signal"]

_R = Requirement
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    libc = _libc()
    ctypes.set_errno(0)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")


def set_parent_death_signal(expected_parent: int) -> None:
    """Die with SIGKILL when the parent dies; exit now if it already has."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(70)  # the parent died before the signal was armed


def _apply_rlimits(policy: SandboxPolicy) -> None:
    limits = [("CORE", 0)]
    if policy.max_open_files is not None:
        limits.append(("NOFILE", policy.max_open_files))
    if policy.max_file_size is not None:
        limits.append(("FSIZE", policy.max_file_size))
    if policy.max_address_space is not None:
        limits.append(("AS", policy.max_address_space))
    for name, value in limits:
        try:
            resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
        except (ValueError, OverflowError) as exc:
            # resource reports EPERM and EINVAL as ValueError; a failed layer
            # must be an OSError to be reported (not a crash of the bootstrap).
            raise OSError(f"setrlimit(RLIMIT_{name}, {value}): {exc}") from exc


def _apply_no_new_privs(policy: SandboxPolicy) -> None:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _apply_namespaces(policy: SandboxPolicy) -> None:
    _namespaces.unshare()


def _apply_landlock(policy: SandboxPolicy) -> None:
    _landlock.restrict_self()


def _apply_seccomp(policy: SandboxPolicy) -> None:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # the kernel requires it (or CAP_SYS_ADMIN)
    _seccomp.install(_seccomp.build_filter(os.getpid()))


_APPLIERS: Final = {
    "rlimits": _apply_rlimits,
    "no_new_privs": _apply_no_new_privs,
    "namespaces": _apply_namespaces,
    "landlock": _apply_landlock,
    "seccomp": _apply_seccomp,
}


def apply_policy(policy: SandboxPolicy) -> SandboxReport:
    """Apply ``policy`` to this process (the worker) and report.

    Stops at the first required layer that fails; the report then names it
    and the caller must not run target code.
    """
    layers: dict[str, str] = {"fd_hygiene": "applied"}
    fds = tuple(sorted(_open_fds()))  # before Landlock takes /proc/self/fd away
    failed: str | None = None
    reason: str | None = None
    for layer, level in policy._levels().items():
        if level is _R.OFF:
            layers[layer] = "off"
            continue
        applier = _APPLIERS[layer]
        try:
            applier(policy)
        except OSError as exc:
            layers[layer] = f"unavailable: {exc}"
            if level is _R.REQUIRED:
                failed, reason = layer, str(exc)
                break
        else:
            layers[layer] = "applied"
    return SandboxReport(
        policy=policy.name,
        pid=os.getpid(),
        uid=os.getuid(),
        layers=layers,
        fds=fds,
        failed=failed,
        reason=reason,
    )


def _open_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue  # listdir's own directory fd, closed by now
        fds.append(fd)
    return fds
