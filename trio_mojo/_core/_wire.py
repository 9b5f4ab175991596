"""The Mojo Channel wire format: header layouts, message types, limits.

Theory of operation
-------------------

Mojo's ``Channel`` frames a byte stream into messages.  Every integer is
little-endian, the header structs are packed, and there is no magic number,
checksum or trailing padding: a message is ``header + payload`` and the next
message starts on the very next byte.  File descriptors never appear in the
stream; they travel beside it as ``SCM_RIGHTS`` ancillary data and each
header only *counts* them (see ``_decoder.py`` for how they are matched up
and ``_encoder.py`` for how they are attached).

A channel runs in one of two framings, fixed for its lifetime:

``Framing.MOJO`` (legacy Mojo core).  Each message starts with one of::

    LegacyHeader (8 bytes), used iff message_type == NORMAL_LEGACY (0)
      0  u32 num_bytes       whole message, header included
      4  u16 num_handles
      6  u16 message_type

    Header (16 bytes), every other type
      0  u32 num_bytes       whole message, header included
      4  u16 num_header_bytes  >= 16; bytes 16..num_header_bytes are an
                             "extra header" that POSIX senders never write
      6  u16 message_type
      8  u16 num_handles
     10  6 bytes padding     zero on send, ignored on receive

  ``num_bytes`` and ``message_type`` sit at the same offsets in both, so a
  reader looks at the first 8 bytes and only then decides which layout
  applies.

``Framing.IPCZ`` (MojoIpcz, what current Chromium speaks)::

    IpczHeader (16 bytes as written; any size >= 8 accepted)
      0  u16 size            size of this header; acts as its version
      2  u16 num_handles
      4  u32 num_bytes       header + data
      8  i64 creation_timeticks_us   sender's CLOCK_MONOTONIC in us

  Receivers skip ``size`` bytes to reach the data, so 8-byte (v1) and larger
  future headers interoperate.

This module is pure: it builds and describes headers and never does I/O.
Parsing lives in the decoder, which inlines the struct formats below for
speed.
"""

from __future__ import annotations

import enum
import struct
import time

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "HEADER_SIZE",
    "IPCZ_HEADER_SIZE",
    "IPCZ_MIN_HEADER_SIZE",
    "LEGACY_HEADER_SIZE",
    "MAX_ATTACHED_HANDLES",
    "MAX_BATCH_READ_SIZE",
    "MAX_MESSAGE_SIZE_LIMIT",
    "MAX_SENDMSG_HANDLES",
    "Framing",
    "HandlePolicy",
    "MessageType",
    "encode_header",
    "encode_message",
]

LEGACY_HEADER_SIZE = 8
"""Size of Mojo's ``LegacyHeader``."""
HEADER_SIZE = 16
"""Size of Mojo's ``Header`` (the POSIX extra header is always empty)."""
IPCZ_HEADER_SIZE = 16
"""Size of the ``IpczHeader`` we write (Linux desktop Chromium's size)."""
IPCZ_MIN_HEADER_SIZE = 8
"""Smallest ``IpczHeader.size`` a receiver accepts (a "v1" header)."""
MAX_SENDMSG_HANDLES = 128
"""Chromium's ``kMaxSendmsgHandles``: fds per ``sendmsg`` and per ``recvmsg``."""
MAX_ATTACHED_HANDLES = 253
"""Chromium's ``kMaxAttachedHandles`` (the kernel's ``SCM_MAX_FD``)."""
MAX_BATCH_READ_SIZE = 256 * 1024
"""Chromium's ``kMaxBatchReadCapacity``: bytes read per wake-up."""
DEFAULT_MAX_MESSAGE_SIZE = 256 * 1024 * 1024
"""Default cap on ``num_bytes`` (Chromium's ``max_message_num_bytes``)."""
MAX_MESSAGE_SIZE_LIMIT = 0xFFFF_FFFF
"""The largest ``num_bytes`` the u32 field can express."""
MAX_HANDLES_FIELD = 0xFFFF
"""The largest handle count the u16 field can express."""


class MessageType(enum.IntEnum):
    """Mojo's ``Channel::Message::MessageType`` (non-iOS values).

    Only ``NORMAL_LEGACY`` and ``NORMAL`` carry application data; the three
    ``UPGRADE_*`` types are control messages for Chromium's shared-memory
    upgrade, which trio_mojo never offers and always declines.
    """

    NORMAL_LEGACY = 0
    """Application data with the 8-byte ``LegacyHeader``."""
    NORMAL = 1
    """Application data with the 16-byte ``Header``: what trio_mojo writes."""
    UPGRADE_OFFER = 2
    """A control message, the peer's offer of a shared-memory upgrade
    (answered with a rejection, never delivered)."""
    UPGRADE_ACCEPT = 3
    """A control message, an offer accepted (never sent by trio_mojo; ignored)."""
    UPGRADE_REJECT = 4
    """A control message, an offer declined (trio_mojo's answer to every
    offer; ignored when received)."""


class Framing(enum.Enum):
    """Which header a channel speaks; both ends must agree.

    ``MOJO`` writes the 16-byte ``Header`` (the 8-byte ``LegacyHeader`` when
    a message's type is ``NORMAL_LEGACY``) and reads both.  ``IPCZ`` writes a
    16-byte ``IpczHeader`` and reads any ``size >= 8``.
    """

    MOJO = "mojo"
    """Legacy Mojo core, with the 16-byte ``Header`` and the 8-byte ``LegacyHeader``."""
    IPCZ = "ipcz"
    """MojoIpcz, with the ``IpczHeader`` (what current Chromium speaks)."""


class HandlePolicy(enum.Enum):
    """Whether a channel accepts file descriptors from its peer.

    With ``REJECT`` any message that declares handles, and any fd that
    arrives, fails the channel with :class:`MalformedMessageError` (Mojo's
    ``kRejectHandles``, meant for peers that must never pass fds).
    """

    ACCEPT = "accept"
    """Fds from the peer are delivered with their messages (the default)."""
    REJECT = "reject"
    """Any fd from the peer fails the channel."""


_HEADER = struct.Struct("<IHHH6x")
_LEGACY_HEADER = struct.Struct("<IHH")
_IPCZ_HEADER = struct.Struct("<HHIq")

_CONTROL_TYPES = frozenset(
    (MessageType.UPGRADE_OFFER, MessageType.UPGRADE_ACCEPT, MessageType.UPGRADE_REJECT)
)


def _now_us() -> int:
    return time.monotonic_ns() // 1000


def encode_header(
    payload_size: int,
    *,
    num_handles: int = 0,
    type: MessageType = MessageType.NORMAL,  # noqa: A002 - mirrors Mojo's field
    framing: Framing = Framing.MOJO,
    timestamp_us: int | None = None,
) -> bytes:
    """Return the header that precedes a payload of ``payload_size`` bytes.

    ``timestamp_us`` fills the IPCZ ``creation_timeticks_us`` field (default:
    now, on ``CLOCK_MONOTONIC`` like Chromium's ``base::TimeTicks``); it is
    ignored for ``Framing.MOJO``.

    Raises:
        ValueError: the message would not fit the header's fields, the handle
            count is out of range, or ``type`` cannot be written with this
            framing (IPCZ carries only ``NORMAL`` messages).
    """
    if num_handles < 0 or num_handles > MAX_HANDLES_FIELD:
        raise ValueError(f"num_handles={num_handles} is outside 0..{MAX_HANDLES_FIELD}")
    if payload_size < 0:
        raise ValueError(f"payload_size={payload_size} is negative")
    if framing is Framing.IPCZ:
        if type != MessageType.NORMAL:
            raise ValueError(f"Framing.IPCZ carries only NORMAL messages, not {type!r}")
        num_bytes = IPCZ_HEADER_SIZE + payload_size
        _check_num_bytes(num_bytes)
        stamp = _now_us() if timestamp_us is None else timestamp_us
        return _IPCZ_HEADER.pack(IPCZ_HEADER_SIZE, num_handles, num_bytes, stamp)
    if framing is not Framing.MOJO:
        raise ValueError(f"unknown framing {framing!r}")
    type = MessageType(type)  # noqa: A001 - rejects unknown ints with ValueError
    if type == MessageType.NORMAL_LEGACY:
        num_bytes = LEGACY_HEADER_SIZE + payload_size
        _check_num_bytes(num_bytes)
        return _LEGACY_HEADER.pack(num_bytes, num_handles, type)
    num_bytes = HEADER_SIZE + payload_size
    _check_num_bytes(num_bytes)
    return _HEADER.pack(num_bytes, HEADER_SIZE, type, num_handles)


def _check_num_bytes(num_bytes: int) -> None:
    if num_bytes > MAX_MESSAGE_SIZE_LIMIT:
        raise ValueError(
            f"message of {num_bytes} bytes does not fit the u32 num_bytes field"
        )


def encode_message(
    payload: bytes,
    *,
    num_handles: int = 0,
    type: MessageType = MessageType.NORMAL,  # noqa: A002 - mirrors Mojo's field
    framing: Framing = Framing.MOJO,
    timestamp_us: int | None = None,
) -> bytes:
    """Return the wire bytes of one message: its header followed by ``payload``.

    The fds themselves are not part of the bytes; ``num_handles`` only
    records how many will travel beside them.  See :func:`encode_header` for
    the arguments and errors.

    >>> encode_message(b"hello").hex(" ")
    '15 00 00 00 10 00 01 00 00 00 00 00 00 00 00 00 68 65 6c 6c 6f'
    """
    header = encode_header(
        len(payload),
        num_handles=num_handles,
        type=type,
        framing=framing,
        timestamp_us=timestamp_us,
    )
    return header + payload
