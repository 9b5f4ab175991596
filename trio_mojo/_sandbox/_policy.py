"""The sandbox policy: which layers a worker gets and how strictly.

A policy is pure data (it crosses to the child as JSON on the command line);
:meth:`SandboxPolicy.check` runs in the parent before spawning and refuses a
policy that requires a layer this machine cannot apply.  See the package
docstring for the layers.
"""

from __future__ import annotations

import enum
import json
import platform
from typing import Any, Final

import attrs

from trio_mojo._errors import SandboxUnavailableError

from . import _landlock, _seccomp

__all__ = ["Requirement", "SandboxPolicy"]

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
