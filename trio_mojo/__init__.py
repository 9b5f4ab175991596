"""trio_mojo: Chromium Mojo's Channel as a Trio structured-concurrency transport.

Length-framed messages over a connected ``AF_UNIX`` socket, byte-compatible
with Mojo's ``ChannelPosix``, with file descriptors passed beside them
(``SCM_RIGHTS``), and sandboxed worker processes connected to their parent by
such a channel.  See ``docs/`` for the design and a tutorial.
"""

from __future__ import annotations

from ._channel import Channel as Channel
from ._channel import ChannelStatistics as ChannelStatistics
from ._channel import open_channel as open_channel
from ._core._decoder import END_OF_STREAM as END_OF_STREAM
from ._core._decoder import NEED_DATA as NEED_DATA
from ._core._decoder import MessageDecoder as MessageDecoder
from ._core._encoder import MessageEncoder as MessageEncoder
from ._core._encoder import OutgoingMessage as OutgoingMessage
from ._core._message import Message as Message
from ._core._wire import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from ._core._wire import MAX_ATTACHED_HANDLES as MAX_ATTACHED_HANDLES
from ._core._wire import MAX_SENDMSG_HANDLES as MAX_SENDMSG_HANDLES
from ._core._wire import Framing as Framing
from ._core._wire import HandlePolicy as HandlePolicy
from ._core._wire import MessageType as MessageType
from ._core._wire import encode_header as encode_header
from ._core._wire import encode_message as encode_message
from ._endpoint import Endpoint as Endpoint
from ._endpoint import channel_pair as channel_pair
from ._errors import BrokerError as BrokerError
from ._errors import ChannelError as ChannelError
from ._errors import DisconnectedError as DisconnectedError
from ._errors import FlushTimeoutError as FlushTimeoutError
from ._errors import MalformedMessageError as MalformedMessageError
from ._errors import SandboxUnavailableError as SandboxUnavailableError
from ._errors import WorkerError as WorkerError
from ._errors import WorkerTargetError as WorkerTargetError
from ._handles import Handle as Handle
from ._sandbox import Requirement as Requirement
from ._sandbox import SandboxPolicy as SandboxPolicy
from ._sandbox import SandboxReport as SandboxReport
from ._workers._broker import BrokerClient as BrokerClient
from ._workers._broker import FileAccess as FileAccess
from ._workers._broker import FileBroker as FileBroker
from ._workers._broker import current_broker as current_broker
from ._workers._pool import WorkerPool as WorkerPool
from ._workers._pool import WorkerPoolStatistics as WorkerPoolStatistics
from ._workers._pool import open_worker_pool as open_worker_pool
from ._workers._pool_map import WorkerPoolMap as WorkerPoolMap
from ._workers._serve import serve as serve
from ._workers._spawn import CHANNEL_SWITCH as CHANNEL_SWITCH
from ._workers._spawn import ChildProcess as ChildProcess
from ._workers._spawn import Process as Process
from ._workers._spawn import (
    open_process_with_channel as open_process_with_channel,
)
from ._workers._spawn import recover_endpoint as recover_endpoint
from ._workers._worker import Worker as Worker
from ._workers._worker import open_worker as open_worker
from ._workers._zygote import ForkedProcess as ForkedProcess
from ._workers._zygote import Zygote as Zygote
from ._workers._zygote import open_zygote as open_zygote

__version__ = "0.1.0"

__all__ = [
    "CHANNEL_SWITCH",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "END_OF_STREAM",
    "MAX_ATTACHED_HANDLES",
    "MAX_SENDMSG_HANDLES",
    "NEED_DATA",
    "BrokerClient",
    "BrokerError",
    "Channel",
    "ChannelError",
    "ChannelStatistics",
    "ChildProcess",
    "DisconnectedError",
    "Endpoint",
    "FileAccess",
    "FileBroker",
    "FlushTimeoutError",
    "ForkedProcess",
    "Framing",
    "Handle",
    "HandlePolicy",
    "MalformedMessageError",
    "Message",
    "MessageDecoder",
    "MessageEncoder",
    "MessageType",
    "OutgoingMessage",
    "Process",
    "Requirement",
    "SandboxPolicy",
    "SandboxReport",
    "SandboxUnavailableError",
    "Worker",
    "WorkerError",
    "WorkerPool",
    "WorkerPoolMap",
    "WorkerPoolStatistics",
    "WorkerTargetError",
    "Zygote",
    "channel_pair",
    "current_broker",
    "encode_header",
    "encode_message",
    "open_channel",
    "open_process_with_channel",
    "open_worker",
    "open_worker_pool",
    "open_zygote",
    "recover_endpoint",
    "serve",
]


def _present_as_public() -> None:
    """Make every public class and function report ``trio_mojo`` as its module.

    They live in private modules; without this a traceback names
    ``trio_mojo._errors.WorkerError`` and ``help()`` points at
    ``trio_mojo._channel``.  (Trio does the same with
    ``fixup_module_metadata``.)  Pickling by reference still works:
    ``trio_mojo.<name>`` exists.
    """
    namespace = globals()
    for name in __all__:
        obj = namespace[name]
        if isinstance(obj, type) or callable(obj):
            obj.__module__ = __name__


_present_as_public()
