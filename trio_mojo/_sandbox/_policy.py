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
from ._credentials import NOBODY

__all__ = [
    "DEFAULT_MAX_DATA",
    "DEFAULT_MAX_PROCESSES",
    "LAYERS",
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


def _unprivileged_id(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if type(value) is not int or not 0 < value < 2**32 - 1:
        raise ValueError(
            f"{attribute.name}={value!r} must be an unprivileged id (1 .. 2**32-2)"
        )


DEFAULT_MAX_DATA: Final = 8 * 1024**3
"""``RLIMIT_DATA`` of the policies' default: 8 GiB (see ``docs/security.rst``)."""
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
      worker runs as (default 65534, ``nobody``/``nogroup``); a non-root
      parent's worker keeps the parent's ids.
    * ``max_open_files``: ``RLIMIT_NOFILE`` (soft = hard) when ``rlimits``
      is applied; it also caps how many fds the worker can be sent.
    * ``max_file_size``, ``max_address_space``, ``max_data``:
      ``RLIMIT_FSIZE``, ``RLIMIT_AS`` and ``RLIMIT_DATA`` in bytes, or
      ``None`` to leave them alone.  ``max_data`` defaults to
      8 GiB.
    * ``max_processes``: ``RLIMIT_NPROC`` (default
      64): how many tasks, threads included, the
      worker's user namespace may hold.  Set only when the worker has a user
      namespace of its own (otherwise the kernel would count every process
      of the uid).
    """

    name: str = "custom"
    credentials: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    namespaces: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    rootfs: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    rlimits: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    no_new_privs: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    landlock: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    seccomp: Requirement = attrs.field(default=_R.REQUIRED, converter=_requirement)
    worker_uid: int = attrs.field(default=NOBODY, validator=_unprivileged_id)
    worker_gid: int = attrs.field(default=NOBODY, validator=_unprivileged_id)
    max_open_files: int | None = attrs.field(default=256, validator=_positive_or_none)
    max_file_size: int | None = attrs.field(default=None, validator=_positive_or_none)
    max_address_space: int | None = attrs.field(
        default=None, validator=_positive_or_none
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
            max_data=None,
            max_processes=None,
        )

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
