"""The lockdown and the handshake do not assume they run right after ``exec``.

A pre-imported process (what a zygote is) forks a child that calls
``lock_down_and_run`` on the channel it inherited; the test process, as the
parent, locates the worker below that child, verifies it in /proc exactly
as ``open_worker`` does, and sends the go-ahead.
"""

from __future__ import annotations

import subprocess
import sys

import trio

from trio_mojo import Message, SandboxPolicy, SandboxReport, channel_pair, open_channel
from trio_mojo._sandbox._pidns import worker_pid
from trio_mojo._sandbox._verify import verify_report
from trio_mojo._workers._handshake import go_ahead

ZYGOTE = r"""
import os, sys
import trio_mojo
from trio_mojo import Endpoint, SandboxPolicy
from trio_mojo._examples import echo
from trio_mojo._sandbox._apply import set_parent_death_signal
from trio_mojo._workers._bootstrap import lock_down_and_run

fd = int(sys.argv[1])
child = os.fork()
if child == 0:
    set_parent_death_signal(os.getppid())
    os._exit(lock_down_and_run(echo, SandboxPolicy.strict(), Endpoint.from_fd(fd)))
os.close(fd)
print(child, flush=True)
_, status = os.waitpid(child, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
"""


async def test_a_forked_child_locks_down_and_waits_for_its_go_ahead() -> None:
    local, remote = channel_pair()
    with local, remote:
        zygote = await trio.lowlevel.open_process(
            [sys.executable, "-I", "-c", ZYGOTE, str(remote.fileno())],
            pass_fds=(remote.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        remote.close()
        assert zygote.stdout is not None
        try:
            with trio.fail_after(30):
                child = int(await zygote.stdout.receive_some())
            async with open_channel(local) as channel:
                with await channel.receive() as first:
                    report = SandboxReport.from_bytes(first.payload)
                worker = worker_pid(child)
                # The forked child took the worker's ids, and is its supervisor.
                verify_report(
                    worker, SandboxPolicy.strict(), report, identity_pid=child
                )  # no raise
                await channel.send(go_ahead(report))
                await channel.send(Message(b"from a forked worker"))
                with await channel.receive() as reply:
                    assert reply.payload == b"from a forked worker"
            with trio.fail_after(30):
                status = await zygote.stdout.receive_some()
                await zygote.wait()
        finally:
            zygote.kill()
            await zygote.wait()
            await zygote.stdout.aclose()
    assert report.ok
    assert set(report.layers.values()) == {"applied"}
    assert status == b"0\n"  # the forked child exited as its worker did
