"""Pick the strictest sandbox this machine supports, and let a worker write."""

import tempfile

import attrs
import trio

import trio_mojo


def strictest_available() -> trio_mojo.SandboxPolicy:
    """strict(), or the next policy whose required layers this machine has."""
    policies = [
        trio_mojo.SandboxPolicy.strict(),
        trio_mojo.SandboxPolicy.default(),
        trio_mojo.SandboxPolicy.basic(),
    ]
    for policy in policies:
        try:
            policy.check()  # probes this machine; spawns nothing
        except trio_mojo.SandboxUnavailableError as exc:
            print(f"{policy.name}() is not available here: {exc.layer}")
        else:
            return policy
    raise RuntimeError("not even basic() works here")


async def main(tmp: str) -> None:
    policy = strictest_available()
    async with trio_mojo.open_worker("trio_mojo._examples:echo", sandbox=policy) as w:
        print("policy:", w.sandbox_report.policy, "ok:", w.sandbox_report.ok)

    # strict() sets RLIMIT_FSIZE to 0: no write can succeed, so a writable
    # rule is refused.  Give the policy a file-size limit instead.
    rules = [trio_mojo.FileAccess.read_write(tmp)]
    try:
        async with trio_mojo.open_worker(
            "trio_mojo._examples:broker_reader", file_access=rules
        ):
            pass
    except ValueError as exc:
        print("ValueError:", exc)
    writer = attrs.evolve(trio_mojo.SandboxPolicy.strict(), max_file_size=1 << 20)
    async with trio_mojo.open_worker(
        "trio_mojo._examples:broker_reader", sandbox=writer, file_access=rules
    ) as worker:
        await worker.channel.send(trio_mojo.Message(f"w {tmp}/out.txt".encode()))
        print("worker:", (await worker.channel.receive()).payload)


with tempfile.TemporaryDirectory() as tmp:
    trio.run(main, tmp)
    with open(f"{tmp}/out.txt") as file:
        print("file:", file.read())
