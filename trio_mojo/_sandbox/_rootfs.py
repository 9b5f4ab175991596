"""The root file system: an empty, read-only root, so that no path resolves.

Theory of operation
-------------------

Landlock denies opening paths, but not everything that takes a path:
``connect``/``sendto`` to a pathname unix socket (``/dev/log``, a daemon's
control socket) is not covered up to Landlock ABI 7, and ``stat`` still
sees the host's tree.  Chromium's renderer and nsjail answer with an empty
root; so do we.  In the worker's own mount namespace (``_namespaces``),
with the capabilities its user namespace gives it, :func:`enter_empty_root`:

1. makes every mount private, so nothing below propagates to the host;
2. mounts a tiny tmpfs (one inode, mode 0555, no suid, devices or exec) on
   :data:`MOUNT_POINT` (bubblewrap uses ``/tmp`` the same way; any
   directory would do, the mount is invisible outside the namespace);
3. ``pivot_root(".", ".")`` from inside it, which stacks the old root on
   top of the new one, and detaches the old root (``MNT_DETACH``): the
   host's tree is no longer reachable from this mount namespace at all, not
   even through ``..`` or a chroot escape;
4. remounts the new root read-only.

The working directory is then ``/`` and every path resolves to nothing:
``open``, ``stat``, ``connect`` or ``sendto`` a path gives ``ENOENT``
(or ``EROFS`` to create).  Fds the worker holds or receives are not
affected.  This must happen after the imports and before Landlock (a
Landlock domain forbids mounting) and the capability drop.

The parent checks from outside (:func:`check_empty_root`): seen through
``/proc/<pid>/root``, the worker's root is another file system than the
parent's, empty and read-only.  After lockdown the worker holds no
capability, so it cannot mount anything to make that look otherwise.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from . import _libc

__all__ = ["MOUNT_POINT", "check_empty_root", "enter_empty_root"]

MOUNT_POINT: Final = "/tmp"
"""Where the empty tmpfs is mounted before it becomes the root."""

_MS_RDONLY: Final = 0x1
_MS_NOSUID: Final = 0x2
_MS_NODEV: Final = 0x4
_MS_NOEXEC: Final = 0x8
_MS_REMOUNT: Final = 0x20
_MS_BIND: Final = 0x1000
_MS_REC: Final = 0x4000
_MS_PRIVATE: Final = 0x40000
_MNT_DETACH: Final = 0x2
_LOCKED_DOWN: Final = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
_TMPFS_OPTIONS: Final = b"size=4k,nr_inodes=1,mode=0555"


def _mount(
    source: bytes | None,
    target: bytes,
    fstype: bytes | None,
    flags: int,
    data: bytes | None,
) -> None:
    _libc.call("mount", source, target, fstype, ctypes.c_ulong(flags), data)


def enter_empty_root() -> None:
    """Make the root of this mount namespace an empty read-only tmpfs.

    Needs a mount namespace of its own and ``CAP_SYS_ADMIN`` in its user
    namespace.

    Raises:
        OSError: a mount call failed, or :data:`MOUNT_POINT` is missing.
    """
    _mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    _mount(b"tmpfs", MOUNT_POINT.encode(), b"tmpfs", _LOCKED_DOWN, _TMPFS_OPTIONS)
    os.chdir(MOUNT_POINT)
    _libc.syscall("pivot_root", b".", b".")
    _libc.call("umount2", b".", _MNT_DETACH)
    os.chdir("/")
    remount = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _LOCKED_DOWN
    _mount(None, b"/", None, remount, None)


def check_empty_root(pid: int) -> str | None:
    """What is wrong with the root of process ``pid``, or ``None`` (in the parent).

    Raises:
        OSError: ``/proc/<pid>/root`` cannot be read (the process is gone,
            or this process may not inspect it).
    """
    root = f"/proc/{pid}/root"
    theirs = os.stat(root + "/")
    ours = os.stat("/")
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        return "its root is the parent's root"
    entries = os.listdir(root)
    if entries:
        return f"its root is not empty: {sorted(entries)[:5]}"
    if not os.statvfs(root).f_flag & os.ST_RDONLY:
        return "its root is writable"
    return None
