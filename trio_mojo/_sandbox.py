"""Sandbox policy for workers: what to apply, in the child, and how to check it.

Theory of operation
-------------------

A :class:`SandboxPolicy` names a level for every layer: ``REQUIRED`` (the
worker must not run target code without it), ``IF_AVAILABLE`` (applied when
the machine can, recorded in the report when not) or ``OFF``.  Nothing is
ever dropped silently:

1. **In the parent, before spawning**, :meth:`SandboxPolicy.check` compares
   the policy with what this build and machine can apply and raises
   :class:`SandboxUnavailableError` for a required layer that cannot be.
2. **In the child**, after its imports (which need the file system) and
   before any target code runs, :func:`apply_policy` applies the layers in
   order and returns a :class:`SandboxReport`.  A required layer that fails
   here is fatal: the bootstrap reports the failure and exits without
   calling the target.
3. **Back in the parent**, the report is the worker's first message, and
   :func:`verify_report` checks its claims against ``/proc/<pid>/status``
   and ``/proc/<pid>/limits``: a child cannot claim a layer it did not get.

Layers in this release:

* ``fd_hygiene`` (always on): the child holds only 0, 1, 2 and its
  channels; stdin is ``/dev/null``; a new session; ``PR_SET_PDEATHSIG``.
* ``rlimits``: ``RLIMIT_NOFILE`` (also caps the fds a worker can be sent),
  ``RLIMIT_CORE = 0``, optionally ``RLIMIT_FSIZE`` and ``RLIMIT_AS``.
* ``no_new_privs``: ``PR_SET_NO_NEW_PRIVS`` (no setuid elevation, ever).
* ``landlock``: no file-system right at all, no TCP bind/connect, no
  abstract unix sockets or signals outside the worker (``_landlock``).
  The worker still uses every fd it holds or is sent.
* ``namespaces``: new user (identity map of the worker's uid/gid), network
  (no interface up), IPC, UTS and mount namespaces (``_namespaces``),
  checked by the parent in ``/proc/<pid>/ns``.
* ``seccomp``: a system-call allowlist (``_seccomp``, x86_64); anything else
  gets ``EPERM``.  Checked by the parent (``Seccomp: 2`` in
  ``/proc/<pid>/status``).  On another architecture a policy that requires
  it raises :class:`SandboxUnavailableError` before spawning.

Running a worker with no sandbox at all takes the explicit, named opt-out
``SandboxPolicy.none(i_understand_this_is_unsandboxed=True)``.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import platform
import resource
import signal
from collections.abc import Mapping
from typing import Any, Final

import attrs

from . import _landlock, _namespaces, _seccomp
from ._errors import SandboxUnavailableError

__all__ = [
    "Requirement",
    "SandboxPolicy",
    "SandboxReport",
    "apply_policy",
    "verify_report",
]

_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38
_UNAVAILABLE_HINT: Final = (
    "; use a policy with this layer IF_AVAILABLE or OFF (SandboxPolicy.basic()), "
    "or SandboxPolicy.none(i_understand_this_is_unsandboxed=True)"
)
MAX_REPORT_BYTES: Final = 64 * 1024
"""A longer first message is not a sandbox report (real ones are ~0.4 KiB)."""


class Requirement(enum.Enum):
    """How much a sandbox layer matters to a policy."""

    REQUIRED = "required"
    """The worker never runs target code without this layer."""
    IF_AVAILABLE = "if_available"
    """Applied when possible; its absence is recorded in the report."""
    OFF = "off"
    """Not applied."""


_R = Requirement


def _requirement(value: Requirement | str) -> Requirement:
    return value if isinstance(value, Requirement) else Requirement(value)


def _positive_or_none(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise ValueError(
            f"{attribute.name}={value!r} must be a non-negative int or None"
        )


@attrs.frozen(kw_only=True)
class SandboxPolicy:
    """Which sandbox layers a worker gets, and how strictly.

    Use the constructors :meth:`strict`, :meth:`default` or :meth:`none`, or
    build one field by field.  Fields:

    * ``rlimits``, ``no_new_privs``, ``seccomp``, ``landlock``,
      ``namespaces``: a :class:`Requirement` each.
    * ``max_open_files``: ``RLIMIT_NOFILE`` (soft = hard) when ``rlimits``
      is applied; it also caps how many fds the worker can be sent.
    * ``max_file_size``, ``max_address_space``: ``RLIMIT_FSIZE`` and
      ``RLIMIT_AS`` in bytes, or ``None`` to leave them alone.
    """

    name: str = "custom"
    rlimits: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    no_new_privs: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    seccomp: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    landlock: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    namespaces: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    max_open_files: int | None = attrs.field(default=256, validator=_positive_or_none)
    max_file_size: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_address_space: int | None = attrs.field(
        default=None, validator=_positive_or_none
    )

    @classmethod
    def strict(cls) -> SandboxPolicy:
        """Every layer required (Chromium-renderer-like); the documented default."""
        return cls(name="strict", max_file_size=0)

    @classmethod
    def default(cls) -> SandboxPolicy:
        """rlimits, no_new_privs and seccomp required; landlock and namespaces if available."""
        return cls(name="default", landlock=_R.IF_AVAILABLE, namespaces=_R.IF_AVAILABLE)

    @classmethod
    def basic(cls) -> SandboxPolicy:
        """rlimits and no_new_privs required; every other layer applied when
        the machine allows it, and recorded as unavailable when not.

        The portable choice: it runs wherever Linux does, and the report (and
        ``/proc``) say what the worker actually got.
        """
        return cls(
            name="basic",
            seccomp=_R.IF_AVAILABLE,
            landlock=_R.IF_AVAILABLE,
            namespaces=_R.IF_AVAILABLE,
        )

    @classmethod
    def none(cls, *, i_understand_this_is_unsandboxed: bool = False) -> SandboxPolicy:
        """No sandbox at all: an explicit, named opt-out.

        Raises:
            ValueError: unless ``i_understand_this_is_unsandboxed=True``.
        """
        if i_understand_this_is_unsandboxed is not True:
            raise ValueError(
                "SandboxPolicy.none() runs the worker without any sandbox; "
                "pass i_understand_this_is_unsandboxed=True to confirm"
            )
        return cls(
            name="none",
            rlimits=_R.OFF,
            no_new_privs=_R.OFF,
            seccomp=_R.OFF,
            landlock=_R.OFF,
            namespaces=_R.OFF,
            max_open_files=None,
        )

    @property
    def is_unsandboxed(self) -> bool:
        """True when every layer is ``OFF``."""
        return all(self._levels()[layer] is _R.OFF for layer in self._levels())

    def _levels(self) -> dict[str, Requirement]:
        return {
            "rlimits": self.rlimits,
            "no_new_privs": self.no_new_privs,
            "namespaces": self.namespaces,
            "landlock": self.landlock,
            "seccomp": self.seccomp,
        }

    def check(self) -> None:
        """Raise if a required layer cannot be applied; run in the parent.

        Raises:
            SandboxUnavailableError: naming the first such layer.
        """
        if self.seccomp is _R.REQUIRED and not _seccomp.SUPPORTED:
            raise SandboxUnavailableError(
                "seccomp",
                f"no syscall table for {platform.machine()} in this release"
                + _UNAVAILABLE_HINT,
            )
        if self.landlock is _R.REQUIRED:
            try:
                _landlock.abi_version()
            except OSError as exc:
                raise SandboxUnavailableError(
                    "landlock",
                    f"landlock_create_ruleset -> {exc.strerror} (a kernel without "
                    "CONFIG_SECURITY_LANDLOCK, or 'landlock' missing from lsm=)",
                ) from None

    def to_json(self) -> str:
        """Serialise for the child's command line."""
        data = attrs.asdict(self, value_serializer=_serialize)
        return json.dumps(data, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SandboxPolicy:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("a sandbox policy is a JSON object")
        return cls(**data)


def _serialize(instance: object, field: object, value: object) -> object:
    return value.value if isinstance(value, Requirement) else value


@attrs.frozen(kw_only=True)
class SandboxReport:
    """What the worker says it applied; the worker's first message.

    ``layers`` maps each layer to ``"applied"``, ``"off"`` or
    ``"unavailable: <reason>"``; ``failed`` names a required layer that could
    not be applied (the worker then never ran its target).  ``fds`` is the
    worker's fd table just before its target started.
    """

    policy: str
    pid: int
    uid: int
    layers: Mapping[str, str]
    fds: tuple[int, ...]
    failed: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when every required layer was applied."""
        return self.failed is None

    def to_bytes(self) -> bytes:
        """Encode as the JSON payload of the first message."""
        data = attrs.asdict(self)
        data["fds"] = list(self.fds)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> SandboxReport:
        """Parse a report; the worker is untrusted, so check every field.

        Raises:
            ValueError: the payload is not a well-formed report.
        """
        if len(payload) > MAX_REPORT_BYTES:
            raise ValueError(
                f"malformed sandbox report: {len(payload)} bytes, "
                f"more than {MAX_REPORT_BYTES}"
            )
        try:
            data: Any = json.loads(payload)
            layers = _object(data["layers"])
            report = cls(
                policy=_text(data["policy"]),
                pid=_int(data["pid"]),
                uid=_int(data["uid"]),
                layers={_text(k): _text(v) for k, v in layers.items()},
                fds=tuple(_int(fd) for fd in _list(data["fds"])),
                failed=_optional_text(data.get("failed")),
                reason=_optional_text(data.get("reason")),
            )
        # RecursionError: deeply nested JSON arrays or objects.
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise ValueError(f"malformed sandbox report: {exc!r:.200}") from None
        return report

    def describe(self) -> str:
        """One line for humans: policy and each layer's state."""
        layers = ", ".join(f"{k}={v}" for k, v in self.layers.items())
        state = "ok" if self.ok else f"FAILED {self.failed}: {self.reason}"
        return f"pid {self.pid} uid {self.uid} policy={self.policy} [{state}] {layers}"


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise TypeError(f"expected a non-negative int, got {value!r:.80}")
    return value


def _text(value: object) -> str:
    if type(value) is not str:
        raise TypeError(f"expected a string, got {value!r:.80}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _object(value: object) -> dict[object, object]:
    if type(value) is not dict:
        raise TypeError(f"expected an object, got {value!r:.80}")
    return value


def _list(value: object) -> list[object]:
    if type(value) is not list:
        raise TypeError(f"expected a list, got {value!r:.80}")
    return value


# ----------------------------------------------------------------------
# In the child


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


# ----------------------------------------------------------------------
# In the parent


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
