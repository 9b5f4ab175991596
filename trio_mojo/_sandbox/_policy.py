"""The sandbox policy: which layers a worker gets and how strictly.

A policy is pure data (it crosses to the child as JSON on the command line);
:meth:`SandboxPolicy.check` runs in the parent before spawning and refuses a
policy that requires a layer this machine cannot apply.  See the package
docstring for the layers.
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final

import attrs

from trio_mojo._errors import SandboxUnavailableError

from . import _probe

__all__ = [
    "DEFAULT_MAX_ADDRESS_SPACE",
    "DEFAULT_MAX_DATA",
    "DEFAULT_MAX_PROCESSES",
    "LAYERS",
    "PID_MAX_LIMIT",
    "WORKER_ID_BASE",
    "Requirement",
    "SandboxPolicy",
]

LAYERS: Final = (
    "credentials",
    "namespaces",
    "rootfs",
    "rlimits",
    "no_new_privs",
    "landlock",
    "seccomp",
)
"""The layers a policy names, in the order the worker applies them (after
``fd_hygiene``, which is always on)."""

_UNAVAILABLE_HINT: Final = (
    "; use a policy with this layer IF_AVAILABLE or OFF (SandboxPolicy.basic()), "
    "or SandboxPolicy.none(i_understand_this_is_unsandboxed=True)"
)


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


_MAX_ID: Final = 2**32 - 2
"""The highest uid or gid: ``(uid_t) -1`` means "unchanged" to the kernel."""

PID_MAX_LIMIT: Final = 1 << 22
"""The kernel's ceiling for ``/proc/sys/kernel/pid_max``: no pid reaches it."""

WORKER_ID_BASE: Final = 0x70000000
"""The first uid and gid of the per-worker range: 1879048192.

A worker's ids are this plus a host pid, so the range is
``1879048192 .. 1883242495`` (:data:`PID_MAX_LIMIT` ids).  No distribution
allocates there: systemd's table of ranges (``UIDS-GIDS.md``) marks
``1879048192 .. 2147352575`` unused, between the container ranges of
``systemd-nspawn`` (up to 1879048191) and its foreign range (from
2147352576); the subordinate ids of ``/etc/subuid`` stay below 600100000
by shadow's defaults.  ``docs/security.rst`` says how to move it."""


def _unprivileged_id(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if value is not None and (type(value) is not int or not 0 < value <= _MAX_ID):
        raise ValueError(
            f"{attribute.name}={value!r} must be an unprivileged id "
            f"(1 .. 2**32-2) or None (one of its own for each worker)"
        )


def _id_base(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if type(value) is not int or not 0 < value <= _MAX_ID - PID_MAX_LIMIT + 1:
        raise ValueError(
            f"{attribute.name}={value!r} must leave room for a range of "
            f"{PID_MAX_LIMIT} unprivileged ids (1 .. 2**32-2)"
        )


DEFAULT_MAX_DATA: Final = 8 * 1024**3
"""``RLIMIT_DATA`` of the policies' default: 8 GiB (see ``docs/security.rst``)."""
DEFAULT_MAX_ADDRESS_SPACE: Final = 2 * DEFAULT_MAX_DATA
"""``RLIMIT_AS`` of the policies' default: 16 GiB, twice ``RLIMIT_DATA``,
which does not count shared or grows-down mappings (``docs/security.rst``)."""
DEFAULT_MAX_PROCESSES: Final = 64
"""``RLIMIT_NPROC`` of the policies' default: tasks (threads included) of the
worker's user namespace, its supervisor and init among them."""


@attrs.frozen(kw_only=True)
class SandboxPolicy:
    """Which sandbox layers a worker gets, and how strictly.

    Use the constructors :meth:`strict`, :meth:`default`, :meth:`basic` or
    :meth:`none`, or build one field by field (every layer defaults to
    ``REQUIRED``).  Fields:

    * ``credentials``, ``namespaces``, ``rootfs``, ``rlimits``,
      ``no_new_privs``, ``landlock``, ``seccomp``: a :class:`Requirement`
      each (``rootfs`` needs ``namespaces``).
    * ``worker_uid``, ``worker_gid``: the unprivileged ids a root parent's
      worker runs as.  ``None`` (the default) gives each worker ids of its
      own, ``worker_id_base`` plus the host pid of the process that drops
      to them (:meth:`worker_ids`): no two live workers share a uid, so
      none shares the kernel's per-uid counts (fds in flight, queued
      signals, processes) with another.  A fixed ``worker_uid`` is shared
      by every worker of the policy; ``worker_gid=None`` is then the same
      number.  A non-root parent's worker keeps the parent's ids.
    * ``worker_id_base``: the first id of the per-worker range (default
      1879048192, where no distribution allocates ids); the range holds
      4194304 ids, one per possible pid (``docs/security.rst``).
    * ``max_open_files``: ``RLIMIT_NOFILE`` (soft = hard) when ``rlimits``
      is applied; it also caps how many fds the worker can be sent, and
      keep in flight.
    * ``max_file_size``, ``max_address_space``, ``max_data``:
      ``RLIMIT_FSIZE``, ``RLIMIT_AS`` and ``RLIMIT_DATA`` in bytes, or
      ``None`` to leave them alone.  ``max_data`` defaults to 8 GiB and
      ``max_address_space`` to 16 GiB (``RLIMIT_DATA`` does not count
      shared anonymous or grows-down mappings; ``RLIMIT_AS`` counts every
      mapping): lower both together.
    * ``max_processes``: ``RLIMIT_NPROC`` (default 64): how many tasks,
      threads included, the worker may hold.  Set only where the kernel
      counts the worker's tasks alone: in a user namespace of its own, or
      under a uid of its own (otherwise it would count every process of
      the uid).
    """

    name: str = "custom"
    credentials: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    namespaces: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    rootfs: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    rlimits: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    no_new_privs: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    landlock: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    seccomp: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    worker_uid: int | None = attrs.field(default=None, validator=_unprivileged_id)
    worker_gid: int | None = attrs.field(default=None, validator=_unprivileged_id)
    worker_id_base: int = attrs.field(default=WORKER_ID_BASE, validator=_id_base)
    max_open_files: int | None = attrs.field(default=256, validator=_positive_or_none)
    max_file_size: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_address_space: int | None = attrs.field(
        default=DEFAULT_MAX_ADDRESS_SPACE, validator=_positive_or_none
    )
    max_data: int | None = attrs.field(
        default=DEFAULT_MAX_DATA, validator=_positive_or_none
    )
    max_processes: int | None = attrs.field(
        default=DEFAULT_MAX_PROCESSES, validator=_positive_or_none
    )

    def __attrs_post_init__(self) -> None:
        if self.rootfs is _R.REQUIRED and self.namespaces is _R.OFF:
            raise ValueError(
                "rootfs=REQUIRED needs the namespaces layer (a mount namespace of "
                "the worker's own), which this policy turns off"
            )

    @classmethod
    def strict(cls) -> SandboxPolicy:
        """Every layer required (Chromium-renderer-like); the documented default."""
        return cls(name="strict", max_file_size=0)

    @classmethod
    def default(cls) -> SandboxPolicy:
        """credentials, rlimits, no_new_privs and seccomp required; namespaces,
        the empty root and Landlock if available."""
        return cls(
            name="default",
            namespaces=_R.IF_AVAILABLE,
            rootfs=_R.IF_AVAILABLE,
            landlock=_R.IF_AVAILABLE,
        )

    @classmethod
    def basic(cls) -> SandboxPolicy:
        """rlimits and no_new_privs required; every other layer applied when
        the machine allows it, and recorded as unavailable when not.

        The portable choice: it runs wherever Linux does, and the report (and
        ``/proc``) say what the worker actually got.
        """
        return cls(
            name="basic",
            credentials=_R.IF_AVAILABLE,
            namespaces=_R.IF_AVAILABLE,
            rootfs=_R.IF_AVAILABLE,
            seccomp=_R.IF_AVAILABLE,
            landlock=_R.IF_AVAILABLE,
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
            credentials=_R.OFF,
            namespaces=_R.OFF,
            rootfs=_R.OFF,
            rlimits=_R.OFF,
            no_new_privs=_R.OFF,
            seccomp=_R.OFF,
            landlock=_R.OFF,
            max_open_files=None,
            max_address_space=None,
            max_data=None,
            max_processes=None,
        )

    @property
    def per_worker_ids(self) -> bool:
        """True when each worker of a root parent gets ids of its own
        (``worker_uid`` is ``None``)."""
        return self.worker_uid is None

    def worker_ids(self, pid: int) -> tuple[int, int]:
        """The uid and gid a root parent's worker runs as, when ``pid`` is
        the host pid of the process that drops to them.

        With :attr:`per_worker_ids` that is ``worker_id_base + pid`` for
        both: the pid is unique among live processes, so the ids are unique
        among live workers, whatever parent started them, as long as the
        parents share a PID namespace.

        Raises:
            ValueError: ``pid`` is not a pid (outside ``1 ..``
                :data:`PID_MAX_LIMIT`).
        """
        if type(pid) is not int or not 0 < pid < PID_MAX_LIMIT:
            raise ValueError(f"{pid!r} is not a pid")
        uid = self.worker_id_base + pid if self.worker_uid is None else self.worker_uid
        return uid, uid if self.worker_gid is None else self.worker_gid

    @property
    def is_unsandboxed(self) -> bool:
        """True when every layer is ``OFF``."""
        return all(self._levels()[layer] is _R.OFF for layer in self._levels())

    def _levels(self) -> dict[str, Requirement]:
        """Every layer's level, in the order the worker applies them."""
        return {layer: getattr(self, layer) for layer in LAYERS}

    def level(self, layer: str) -> Requirement:
        """The :class:`Requirement` of ``layer``.

        ``layer`` is one of ``"credentials"``, ``"namespaces"``,
        ``"rootfs"``, ``"rlimits"``, ``"no_new_privs"``, ``"landlock"``
        and ``"seccomp"`` (the order in which a worker applies them).

        Raises:
            KeyError: ``layer`` is not one of them.
        """
        return self._levels()[layer]

    def check(self) -> None:
        """Raise if a required layer cannot be applied; run in the parent.

        Probes this process with harmless calls (``_probe``): a kernel
        without the feature, or a seccomp filter the parent itself runs
        under, is found here, before any process is spawned.

        Raises:
            SandboxUnavailableError: naming the first such layer.
        """
        missing = _probe.unavailable_layers()
        for layer, level in self._levels().items():
            if level is _R.REQUIRED and layer in missing:
                raise SandboxUnavailableError(layer, missing[layer] + _UNAVAILABLE_HINT)

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
