"""Verifying a worker's report from outside, in ``/proc/<pid>`` (in the parent).

Theory of operation
-------------------

The worker's report is a claim; the parent believes only what the kernel
shows about the process, which the worker cannot forge once it is locked
down.  :func:`verify_report` runs while the worker waits for its go-ahead
(its target has not run yet) and checks, for each layer the report says
is applied (and every ``REQUIRED`` layer must be):

* **identity**: ``NSpid`` of ``/proc/<pid>/status`` ends with the pid the
  report names (the worker's pid inside its own PID namespace);
* **credentials**: ``Uid`` and ``Gid`` (all four ids) are exactly the ids
  the policy gives the process that dropped to them under a root parent
  (``SandboxPolicy.worker_ids`` of its host pid: the process the parent
  started or the zygote forked), the parent's own otherwise; no
  supplementary group under a root parent; ``CapEff``, ``CapPrm``,
  ``CapInh``, ``CapBnd`` and ``CapAmb`` all zero; and, under a root
  parent, not dumpable (its ``/proc`` files belong to root);
* **namespaces**: every ``/proc/<pid>/ns`` inode differs from ours;
* **rootfs**: ``/proc/<pid>/root`` is another file system than ours, empty
  and read-only (``_rootfs.check_empty_root``);
* **rlimits**: each limit of ``/proc/<pid>/limits`` is the policy's
  (``RLIMIT_NPROC`` where the kernel counts the worker alone:
  ``_apply.counted_alone``);
* **no_new_privs**, **seccomp**: ``NoNewPrivs: 1``, ``Seccomp: 2``.

Landlock leaves no trace in ``/proc``; the escape tests check it.  A
``/proc`` file that cannot be read raises :class:`OSError` (the worker may
have died meanwhile: the caller tells that apart from a sandbox failure).
"""

from __future__ import annotations

import os
from typing import Final

from trio_mojo._errors import SandboxUnavailableError

from . import _namespaces, _rootfs
from ._apply import counted_alone, rlimits_of
from ._policy import Requirement, SandboxPolicy
from ._report import SandboxReport

__all__ = ["verify_report"]

_R = Requirement
_CAPABILITY_SETS: Final = ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb")
_LIMIT_LABELS: Final = {
    "CORE": "Max core file size",
    "NOFILE": "Max open files",
    "FSIZE": "Max file size",
    "AS": "Max address space",
    "DATA": "Max data size",
    "NPROC": "Max processes",
}


class _Status:
    """``/proc/<pid>/status``, read once."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fields: dict[str, str] = {}
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                self.fields[key] = value.strip()

    def expect(self, layer: str, field: str, value: str) -> None:
        seen = self.fields.get(field)
        if seen != value:
            raise SandboxUnavailableError(
                layer, f"claimed, but /proc/{self.pid}/status shows {field}: {seen}"
            )


def _proc_soft_limits(pid: int) -> dict[str, str]:
    limits = {}
    with open(f"/proc/{pid}/limits") as file:
        for line in file:
            for name, label in _LIMIT_LABELS.items():
                if line.startswith(label):
                    limits[name] = line[len(label) :].split()[0]
    return limits


def verify_report(
    pid: int,
    policy: SandboxPolicy,
    report: SandboxReport,
    *,
    identity_pid: int | None = None,
) -> None:
    """Check the claims of the worker ``pid`` (its host pid) in ``/proc``.

    ``identity_pid`` is the host pid of the process that dropped to the
    worker's ids, whose ids it inherited: the process the parent started
    (the worker's supervisor) or the zygote forked (default: ``pid``).

    Raises:
        SandboxUnavailableError: the report is for another process, lacks a
            required layer, or claims something ``/proc`` contradicts.
        OSError: a ``/proc`` file of ``pid`` cannot be read.
    """
    if report.failed is not None:
        raise SandboxUnavailableError(
            report.failed, report.reason or "failed in the worker"
        )
    for layer, level in policy._levels().items():
        if level is _R.REQUIRED and report.layers.get(layer) != "applied":
            raise SandboxUnavailableError(
                layer, f"required, but the worker reports {report.layers.get(layer)!r}"
            )
    status = _Status(pid)
    own_pid = status.fields.get("NSpid", "").split()[-1:]
    if own_pid != [str(report.pid)]:
        raise SandboxUnavailableError(
            "report",
            f"the report names pid {report.pid}, /proc/{pid}/status shows NSpid {own_pid}",
        )

    def applied(layer: str) -> bool:
        return report.layers.get(layer) == "applied"

    if applied("no_new_privs"):
        status.expect("no_new_privs", "NoNewPrivs", "1")
    if applied("seccomp"):
        status.expect("seccomp", "Seccomp", "2")
    if applied("credentials"):
        _verify_credentials(status, policy, identity_pid or pid)
    if applied("namespaces"):
        same = set(_namespaces.NAMESPACES) - set(_namespaces.differing_namespaces(pid))
        if same:
            raise SandboxUnavailableError(
                "namespaces",
                f"claimed, but /proc/{pid}/ns shows the parent's {sorted(same)} namespaces",
            )
    if applied("rootfs"):
        problem = _rootfs.check_empty_root(pid)
        if problem is not None:
            raise SandboxUnavailableError("rootfs", f"claimed, but {problem}")
    if applied("rlimits"):
        alone = counted_alone(policy, report.layers, as_root=os.geteuid() == 0)
        _verify_rlimits(pid, policy, alone)


def _verify_credentials(status: _Status, policy: SandboxPolicy, dropped: int) -> None:
    if os.geteuid() == 0:
        uid, gid = policy.worker_ids(dropped)
        status.expect("credentials", "Groups", "")
        # A non-dumpable process's /proc files belong to root, whatever its uid.
        owner = os.stat(f"/proc/{status.pid}/status").st_uid
        if owner != 0:
            raise SandboxUnavailableError(
                "credentials",
                f"claimed, but the worker is dumpable (/proc/{status.pid} is uid {owner}'s)",
            )
    else:
        uid, gid = os.getuid(), os.getgid()
    status.expect("credentials", "Uid", "\t".join([str(uid)] * 4))
    status.expect("credentials", "Gid", "\t".join([str(gid)] * 4))
    for field in _CAPABILITY_SETS:
        status.expect("credentials", field, "0" * 16)


def _verify_rlimits(pid: int, policy: SandboxPolicy, alone: bool) -> None:
    seen = _proc_soft_limits(pid)
    for name, value in rlimits_of(policy, alone).items():
        if seen.get(name) != str(value):
            raise SandboxUnavailableError(
                "rlimits",
                f"claimed {_LIMIT_LABELS[name]} {value}, /proc/{pid}/limits shows "
                f"{seen.get(name)}",
            )
