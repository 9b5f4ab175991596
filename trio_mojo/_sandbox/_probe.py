"""Probing, in the parent, which layers a worker could get here.

Theory of operation
-------------------

A required layer that cannot be applied must be refused *before* a worker
is spawned, and the parent must not find out by trying: seccomp,
Landlock, ``unshare`` and the uid drop cannot be undone.  So each probe is
a system call that changes nothing but fails exactly as the real one
would, which also catches a seccomp filter the parent itself runs under (a
container's, or one that fakes a missing kernel feature):

* ``seccomp``: a syscall table for this architecture, and
  ``seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &SECCOMP_RET_KILL_PROCESS)``;
* ``landlock``: ``landlock_create_ruleset(NULL, 0, VERSION)``;
* ``namespaces``: ``unshare(0)`` (a no-op that a filter denying ``unshare``
  still refuses), ``user.max_user_namespaces`` above 0 and, for a non-root
  parent, the distribution switches for unprivileged user namespaces;
* ``rootfs``: the namespaces, and a mount point (:data:`_rootfs.MOUNT_POINT`);
* ``credentials``: a root parent must hold ``CAP_SETUID``, ``CAP_SETGID``
  and ``CAP_SETPCAP`` to drop its worker to another uid.

``rlimits`` and ``no_new_privs`` work on every Linux kernel this library
runs on.  The probes cost a few microseconds and run on every
:meth:`SandboxPolicy.check`, so a parent that gets confined later is
noticed too.  The worker still applies and reports each layer itself; the
probe only moves the refusal of the obvious cases before the spawn.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Callable
from typing import Final

from . import _landlock, _libc, _rootfs, _seccomp, _syscalls

__all__ = ["unavailable_layers"]

_SECCOMP_GET_ACTION_AVAIL: Final = 2
_SECCOMP_RET_KILL_PROCESS: Final = 0x80000000
_CAP_SETGID: Final = 6
_CAP_SETUID: Final = 7
_CAP_SETPCAP: Final = 8
_USERNS_SWITCHES: Final = (
    # (file, value that disables unprivileged user namespaces)
    ("/proc/sys/kernel/unprivileged_userns_clone", "0"),  # Debian, Ubuntu
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1"),  # Ubuntu
)


def _refused(what: str, hint: str, call: Callable[[], object]) -> str | None:
    """``None`` if ``call()`` works, else why (its errno name and ``hint``)."""
    try:
        call()
    except _syscalls.NoNumberError as exc:
        return str(exc.strerror)  # not the kernel's answer: say so
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return f"{what} -> {name} ({hint})"
    return None


def _sysctl(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None


def _seccomp_missing() -> str | None:
    if not _seccomp.SUPPORTED:
        return f"no syscall table for {platform.machine()} in this release"
    action = ctypes.c_uint32(_SECCOMP_RET_KILL_PROCESS)
    return _refused(
        "seccomp(SECCOMP_GET_ACTION_AVAIL)",
        "a kernel without CONFIG_SECCOMP_FILTER, or a seccomp filter this "
        "process runs under",
        lambda: _libc.syscall(
            "seccomp", _SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action)
        ),
    )


def _landlock_missing() -> str | None:
    return _refused(
        "landlock_create_ruleset",
        "a kernel without CONFIG_SECURITY_LANDLOCK, 'landlock' missing from "
        "lsm=, or a seccomp filter this process runs under",
        _landlock.abi_version,
    )


def _namespaces_missing() -> str | None:
    refused = _refused(
        "unshare",
        "a seccomp filter this process runs under, e.g. a container's",
        lambda: _libc.call("unshare", 0),
    )
    if refused is not None:
        return refused
    if _sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled (user.max_user_namespaces = 0)"
    if os.geteuid() != 0:
        for path, disabled in _USERNS_SWITCHES:
            if _sysctl(path) == disabled:
                name = path.removeprefix("/proc/sys/").replace("/", ".")
                return (
                    f"unprivileged user namespaces are disabled ({name} = {disabled})"
                )
    return None


def _capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _credentials_missing() -> str | None:
    if os.geteuid() != 0:
        return None  # nothing to drop but capabilities, which always works
    needed = {"CAP_SETUID": _CAP_SETUID, "CAP_SETGID": _CAP_SETGID,
              "CAP_SETPCAP": _CAP_SETPCAP}  # fmt: skip
    held = _capabilities()
    lacking = [name for name, bit in needed.items() if not held >> bit & 1]
    if lacking:
        return (
            f"a root parent without {', '.join(lacking)} cannot drop its worker's uid"
        )
    return None


def unavailable_layers() -> dict[str, str]:
    """Each layer this process cannot give a worker, with the reason."""
    missing: dict[str, str] = {}
    for layer, probe in (
        ("seccomp", _seccomp_missing),
        ("landlock", _landlock_missing),
        ("namespaces", _namespaces_missing),
        ("credentials", _credentials_missing),
    ):
        reason = probe()
        if reason is not None:
            missing[layer] = reason
    if "namespaces" in missing:
        missing["rootfs"] = "needs the namespaces layer: " + missing["namespaces"]
    elif not os.path.isdir(_rootfs.MOUNT_POINT):
        missing["rootfs"] = f"no {_rootfs.MOUNT_POINT} directory to mount it on"
    return missing
