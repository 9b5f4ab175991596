"""``python -m trio_mojo bench pool``: the JSON job through a worker pool and its peers.

10,000 JSON documents of about 3.6 KB each go to 4 worker processes; each
worker parses its document and sends back a small summary.  Measured
systems, each in a fresh interpreter per repetition, workers started and
warmed up before the clock starts:

* ``trio_mojo``: ``open_worker_pool`` (``SandboxPolicy.strict()``) and
  ``pool.map``; ``trio_mojo_64`` the same with ``max_in_flight=64`` (each
  worker holds up to 64 documents, as ``chunksize=64`` gives one 64);
* ``mp_chunk1``, ``mp_chunk64``: ``multiprocessing.Pool(4).imap`` with
  ``chunksize`` 1 and 64;
* ``trio_parallel``: ``trio_parallel.run_sync`` from 4 tasks (limiter 4);
* ``anyio``: ``anyio.to_process.run_sync`` from 4 tasks (limiter 4), on Trio.

Every run checks each summary against one computed in-process.  Reported:
documents per second (median of the repetitions), the parent's CPU per
document, and the ratio of ``trio_mojo`` to each peer.  ``--profile FILE``
runs the ``trio_mojo`` parent under cProfile once and prints where its time
per request goes.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import multiprocessing
import pstats
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from trio_mojo._channel import Channel
from trio_mojo._core._message import Message
from trio_mojo._workers._pool import DEFAULT_MAX_IN_FLIGHT, open_worker_pool
from trio_mojo._workers._serve import serve

__all__ = ["main", "make_documents", "serve_summaries", "summarize"]

WORKERS: Final = 4
DOCUMENTS: Final = 10_000
_SEED: Final = 20_240_611
_WARM_UP: Final = 16


def make_documents(count: int, seed: int = _SEED) -> list[bytes]:
    """``count`` JSON documents of about 3.6 KB each, the same for a given seed."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    documents = []
    for index in range(count):
        items = [
            {
                "sku": f"SKU-{rng.randrange(100_000):05d}",
                "qty": rng.randrange(1, 20),
                "price": round(rng.uniform(0.5, 500.0), 2),
                "note": " ".join(rng.choices(words, k=4)),
            }
            for _ in range(rng.randrange(35, 45))
        ]
        document = {
            "id": index,
            "customer": {
                "name": f"customer {rng.randrange(10**6)}",
                "email": f"user{rng.randrange(10**6)}@example.org",
                "tags": rng.sample(words, 3),
            },
            "created": f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
            "items": items,
        }
        documents.append(json.dumps(document).encode())
    return documents


def summarize(document: bytes) -> bytes:
    """The work of one job: parse a document, return a small JSON summary."""
    data = json.loads(document)
    items = data["items"]
    total = sum(item["qty"] * item["price"] for item in items)
    summary = {
        "id": data["id"],
        "items": len(items),
        "skus": len({item["sku"] for item in items}),
        "total": round(total, 2),
    }
    return json.dumps(summary, separators=(",", ":")).encode()


async def serve_summaries(channel: Channel) -> None:
    """Worker target of the ``trio_mojo`` system: one summary per document."""

    async def handle(request: Message) -> bytes:
        return summarize(request.payload)

    await serve(channel, handle)


# ----------------------------------------------------------------------
# The systems: each returns the summaries, in order, and the seconds taken.


Timed = tuple[list[bytes], float, float]
"""Summaries, wall seconds, parent CPU seconds of the timed part."""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_trio_mojo(
    documents: list[bytes],
    workers: int,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    profiler: cProfile.Profile | None = None,
) -> Timed:
    async def job() -> Timed:
        async with open_worker_pool(
            "trio_mojo._bench._pool:serve_summaries",
            workers=workers,
            max_in_flight=max_in_flight,
        ) as pool:
            async for reply in pool.map(Message(d) for d in documents[:_WARM_UP]):
                reply.close()
            if profiler is not None:
                profiler.enable()
            cpu, start = _cpu(), time.perf_counter()
            out = [reply.payload async for reply in pool.map(map(Message, documents))]
            seconds, cpu = time.perf_counter() - start, _cpu() - cpu
            if profiler is not None:
                profiler.disable()
            return out, seconds, cpu

    return trio.run(job)


def _run_mp(documents: list[bytes], workers: int, chunksize: int) -> Timed:
    with multiprocessing.Pool(workers) as pool:
        pool.map(summarize, documents[:_WARM_UP], chunksize=1)
        cpu, start = _cpu(), time.perf_counter()
        out = list(pool.imap(summarize, documents, chunksize=chunksize))
        return out, time.perf_counter() - start, _cpu() - cpu


async def _fan_out(
    documents: list[bytes], workers: int, call: Callable[[bytes], Any]
) -> list[bytes]:
    """Run ``call`` on every document from ``workers`` tasks; keep the order."""
    out: list[bytes] = [b""] * len(documents)
    indices = iter(range(len(documents)))

    async def task() -> None:
        for index in indices:
            out[index] = await call(documents[index])

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(task)
    return out


def _run_trio_parallel(documents: list[bytes], workers: int) -> Timed:
    import trio_parallel  # type: ignore[import-untyped, import-not-found, unused-ignore]

    limiter = trio.CapacityLimiter(workers)

    async def call(document: bytes) -> bytes:
        result: bytes = await trio_parallel.run_sync(
            summarize, document, limiter=limiter
        )
        return result

    async def job() -> Timed:
        await _fan_out(documents[:_WARM_UP], workers, call)
        cpu, start = _cpu(), time.perf_counter()
        out = await _fan_out(documents, workers, call)
        return out, time.perf_counter() - start, _cpu() - cpu

    return trio.run(job)


def _run_anyio(documents: list[bytes], workers: int) -> Timed:
    import anyio  # type: ignore[import-not-found, unused-ignore]
    import anyio.to_process  # type: ignore[import-not-found, unused-ignore]

    limiter = anyio.CapacityLimiter(workers)

    async def call(document: bytes) -> bytes:
        result: bytes = await anyio.to_process.run_sync(
            summarize, document, limiter=limiter
        )
        return result

    async def job() -> Timed:
        await _fan_out(documents[:_WARM_UP], workers, call)
        cpu, start = _cpu(), time.perf_counter()
        out = await _fan_out(documents, workers, call)
        return out, time.perf_counter() - start, _cpu() - cpu

    result: Timed = anyio.run(job, backend="trio")
    return result


SYSTEMS: Final[dict[str, Callable[[list[bytes], int], Timed]]] = {
    "trio_mojo": _run_trio_mojo,
    "trio_mojo_64": lambda documents, workers: _run_trio_mojo(documents, workers, 64),
    "mp_chunk1": lambda documents, workers: _run_mp(documents, workers, 1),
    "mp_chunk64": lambda documents, workers: _run_mp(documents, workers, 64),
    "trio_parallel": _run_trio_parallel,
    "anyio": _run_anyio,
}
_NEEDS: Final = {"trio_parallel": "trio_parallel", "anyio": "anyio"}
REFERENCE: Final = "trio_mojo"


def available(system: str) -> bool:
    """True when the system's package is installed."""
    module = _NEEDS.get(system)
    return module is None or importlib.util.find_spec(module) is not None


def run_one(system: str, count: int, workers: int) -> dict[str, Any]:
    """Run one system once, in this process; check every summary."""
    documents = make_documents(count)
    out, seconds, cpu = SYSTEMS[system](documents, workers)
    wrong = sum(
        1 for got, doc in zip(out, documents, strict=False) if got != summarize(doc)
    )
    errors = []
    if len(out) != len(documents) or wrong:
        errors.append(
            f"{wrong} wrong and {len(documents) - len(out)} missing summaries"
        )
    return {
        "system": system,
        "count": count,
        "seconds": seconds,
        "docs_per_s": count / seconds,
        "parent_cpu_us_per_doc": cpu / count * 1e6,
        "mean_document_bytes": sum(map(len, documents)) / len(documents),
        "errors": errors,
    }


def _run_in_child(system: str, count: int, workers: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "trio_mojo._bench._pool", "--one", system]
    argv += ["--count", str(count), "--workers", str(workers)]
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        return {"system": system, "errors": [done.stderr.strip()[-2000:]]}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


_LAYERS: Final = (
    ("pool: dispatch, request slots, map", ("_workers/_pool", "_workers/_requests")),
    (
        "channel: send, receive, encode, decode",
        ("trio_mojo/_channel", "trio_mojo/_core/", "trio_mojo/_fdpass", "Message>"),
    ),
    ("kernel: sendmsg, recvmsg, epoll", ("sendmsg", "recvmsg", "poll")),
    ("trio: scheduler, memory channels", ("/trio/", "/outcome/")),
)


def _layer(filename: str, function: str) -> str:
    for layer, marks in _LAYERS:
        if any(mark in filename or mark in function for mark in marks):
            return layer
    return "other: builtins, the caller's loop"


def profile_pool(count: int, workers: int, top: int = 12) -> str:
    """Profile the ``trio_mojo`` parent's CPU (not wall) time: per layer, per request.

    cProfile's own overhead inflates Python calls, so the shares matter
    more than the absolute microseconds.
    """
    documents = make_documents(count)
    profiler = cProfile.Profile(time.process_time)
    _run_trio_mojo(documents, workers, profiler=profiler)
    stats = pstats.Stats(profiler)
    layers: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, function), (_, _, own, _, _) in raw.items():
        layer = _layer(filename, function)
        layers[layer] = layers.get(layer, 0.0) + own
    total = sum(layers.values())
    lines = [f"{'layer':<52} {'us/request':>10} {'share':>6}"]
    for layer, seconds in sorted(layers.items(), key=lambda item: -item[1]):
        lines.append(
            f"{layer:<52} {seconds / count * 1e6:>10.1f} {seconds / total:>6.0%}"
        )
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    body = text.getvalue()
    return "\n".join(lines) + "\n\n" + body[body.index("   ncalls") :]


def summarise(records: list[dict[str, Any]], systems: Sequence[str]) -> dict[str, Any]:
    """Median docs/s and parent CPU per system, and the ratio to trio_mojo."""
    table: dict[str, Any] = {}
    for system in systems:
        runs = [r for r in records if r["system"] == system and not r["errors"]]
        if not runs:
            continue
        table[system] = {
            "reps": len(runs),
            "docs_per_s": statistics.median(r["docs_per_s"] for r in runs),
            "parent_cpu_us_per_doc": statistics.median(
                r["parent_cpu_us_per_doc"] for r in runs
            ),
        }
    reference = table.get(REFERENCE, {}).get("docs_per_s")
    for cell in table.values():
        cell["trio_mojo_vs_this"] = (
            reference / cell["docs_per_s"] if reference else None
        )
    return table


def render(table: dict[str, Any], count: int, workers: int, size: float) -> str:
    """The results as a text table."""
    title = (
        f"JSON job: {count:,} documents of {size / 1000:.1f} KB mean, {workers} "
        "workers, a summary back per document (median of the repetitions)"
    )
    lines = [
        title,
        "",
        f"{'system':<14} {'docs/s':>10} {'parent CPU us/doc':>18} {'trio_mojo / system':>19}",
    ]
    for system, cell in table.items():
        ratio = cell["trio_mojo_vs_this"]
        lines.append(
            f"{system:<14} {cell['docs_per_s']:>10,.0f} "
            f"{cell['parent_cpu_us_per_doc']:>18.1f} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>19}"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the JSON-job benchmark; returns 0 when every run checked out."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_mojo bench pool",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--count", type=int, default=DOCUMENTS, help="documents per run"
    )
    parser.add_argument("--workers", type=int, default=WORKERS, help="worker processes")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per system")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated systems"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--profile", action="store_true", help="also profile the trio_mojo parent"
    )
    parser.add_argument("--one", metavar="SYSTEM", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count < 1 or args.workers < 1 or args.reps < 1:
        parser.error("--count, --workers and --reps must be positive")
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.count, args.workers)))
        return 0
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(
            f"unknown systems: {', '.join(unknown)} (known: {', '.join(SYSTEMS)})"
        )
    missing = [s for s in systems if not available(s)]
    if missing:
        print(
            f"[bench pool] not installed, skipped: {', '.join(missing)}",
            file=sys.stderr,
        )
    systems = [s for s in systems if s not in missing]
    records = []
    rng = random.Random(args.count)
    for rep in range(args.reps):
        order = systems[:]
        rng.shuffle(order)
        for system in order:
            record = _run_in_child(system, args.count, args.workers)
            record["rep"] = rep
            records.append(record)
            status = (
                record["errors"][0][:300]
                if record["errors"]
                else (f"{record['docs_per_s']:,.0f} docs/s")
            )
            print(f"[bench pool] rep {rep} {system:<14} {status}", file=sys.stderr)
    table = summarise(records, systems)
    size = next((r["mean_document_bytes"] for r in records if not r["errors"]), 0.0)
    print(render(table, args.count, args.workers, size), end="")
    result: dict[str, Any] = {"summary": table, "runs": records}
    if args.profile:
        result["profile"] = profile_pool(args.count, args.workers)
        print(
            "\nWhere the trio_mojo parent spends its CPU per request "
            "(cProfile with process_time around the timed part of one run):"
        )
        print(result["profile"])
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return 1 if any(r["errors"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
