"""Verifying a worker's report from outside, in ``/proc/<pid>`` (in the parent)."""

from __future__ import annotations

from trio_mojo._errors import SandboxUnavailableError

from . import _namespaces
from ._policy import Requirement, SandboxPolicy
from ._report import SandboxReport

__all__ = ["verify_report"]

_R = Requirement


def _proc_status(pid: int) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _proc_soft_limit(pid: int, label: str) -> str:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith(label):
                return line[len(label) :].split()[0]
    return "?"


def verify_report(pid: int, policy: SandboxPolicy, report: SandboxReport) -> None:
    """Check the worker's claims from outside, in ``/proc/<pid>``.

    Raises:
        SandboxUnavailableError: the report is for another process, lacks a
            required layer, or claims something ``/proc`` contradicts.
    """
    if report.pid != pid:
        raise SandboxUnavailableError(
            "report", f"the report names pid {report.pid}, the worker is {pid}"
        )
    if report.failed is not None:
        raise SandboxUnavailableError(
            report.failed, report.reason or "failed in the worker"
        )
    for layer, level in policy._levels().items():
        if level is _R.REQUIRED and report.layers.get(layer) != "applied":
            raise SandboxUnavailableError(
                layer, f"required, but the worker reports {report.layers.get(layer)!r}"
            )
    if report.layers.get("no_new_privs") == "applied":
        seen = _proc_status(pid).get("NoNewPrivs")
        if seen != "1":
            raise SandboxUnavailableError(
                "no_new_privs",
                f"claimed, but /proc/{pid}/status shows NoNewPrivs: {seen}",
            )
    if report.layers.get("seccomp") == "applied":
        seen = _proc_status(pid).get("Seccomp")
        if seen != "2":
            raise SandboxUnavailableError(
                "seccomp", f"claimed, but /proc/{pid}/status shows Seccomp: {seen}"
            )
    if report.layers.get("namespaces") == "applied":
        same = set(_namespaces.NAMESPACES) - set(_namespaces.differing_namespaces(pid))
        if same:
            raise SandboxUnavailableError(
                "namespaces",
                f"claimed, but /proc/{pid}/ns shows the parent's {sorted(same)} namespaces",
            )
    if report.layers.get("rlimits") == "applied":
        _verify_rlimits(pid, policy)


def _verify_rlimits(pid: int, policy: SandboxPolicy) -> None:
    expected = {"Max core file size": 0}
    if policy.max_file_size is not None:
        expected["Max file size"] = policy.max_file_size
    if policy.max_address_space is not None:
        expected["Max address space"] = policy.max_address_space
    for label, value in expected.items():
        seen = _proc_soft_limit(pid, label)
        if seen != str(value):
            raise SandboxUnavailableError(
                "rlimits", f"claimed {label}={value}, /proc/{pid}/limits shows {seen}"
            )
    if policy.max_open_files is not None:
        seen = _proc_soft_limit(pid, "Max open files")
        if seen != str(policy.max_open_files):
            raise SandboxUnavailableError(
                "rlimits",
                f"claimed NOFILE={policy.max_open_files}, /proc/{pid}/limits shows {seen}",
            )
