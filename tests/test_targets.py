"""Worker targets: what is accepted, and the one line that says what is wrong.

Every problem with a target is a :class:`WorkerTargetError` whose message
is one line, checked here word for word: the malformed strings and the
function objects a worker cannot import (refused in the parent, before any
process starts), the modules a worker's interpreter cannot import in
isolated mode (found in the parent without importing them), and what only
an import can tell (reported by the worker, or the zygote, on its channel).
No traceback a user sees from these, or from a worker that dies, shows a
``WouldBlock`` or an ``EndOfChannel`` (:func:`shown_chain`).
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _process_support import children, shown_chain, worker_block_error
from _zygote_support import TESTS, interpreter

import trio_mojo
from trio_mojo import (
    Channel,
    Message,
    SandboxPolicy,
    Worker,
    WorkerError,
    WorkerTargetError,
    _examples,
    _examples_pool,
    open_worker,
    open_worker_pool,
    open_zygote,
)
from trio_mojo._workers import _importable
from trio_mojo._workers._handshake import TARGET_FAILED_EXIT
from trio_mojo._workers._importable import NotImportableError, locate, parse_answer

BASIC = SandboxPolicy.basic()
PYTHON = sys.executable
EXAMPLES = "trio_mojo._examples"
HERE = __name__
ISOLATED = (
    "(workers run in isolated mode: the script's directory and PYTHONPATH are "
    "not on sys.path"
)
INSTALL = "; install it into that environment, e.g. with pip install -e ."
NOT_ASYNC = "a worker runs await target(channel), so define it with async def"
TOP_LEVEL = "define it with async def at the top level of an installed module"


# Function objects, good and bad, as a program would define them.

LAMBDAS = [lambda channel: channel.aclose()]


def make_closure() -> Callable[[Channel], Any]:
    async def inner(channel: Channel) -> None:
        await channel.aclose()

    return inner


class Holder:
    async def method(self, channel: Channel) -> None:
        await channel.aclose()


def sync_target(channel: Channel) -> None:
    del channel


async def twin(channel: Channel) -> None:
    await channel.aclose()


TWIN_COPY = types.FunctionType(twin.__code__, globals(), "twin")
"""Named ``twin`` like the function above, but another object."""


async def refused(target: object, **options: Any) -> WorkerTargetError:
    """Open a worker on ``target``: it must be refused before any process."""
    before = children()
    with pytest.raises(WorkerTargetError) as info:
        async with open_worker(target, sandbox=BASIC, **options):  # type: ignore[arg-type]
            pytest.fail("the block must not run")
    assert children() == before
    _one_clean_line(info.value)
    return info.value


def _one_clean_line(error: BaseException) -> None:
    assert "\n" not in str(error)
    assert shown_chain(error) == [error]


# ----------------------------------------------------------------------
# In the parent, before anything starts: the string, the function object


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            "module",
            "worker target must look like 'package.module:function', not 'module'",
        ),
        (
            "m:f:g",
            "worker target must look like 'package.module:function', not 'm:f:g'",
        ),
        (":f", "worker target must look like 'package.module:function', not ':f'"),
        ("a..b:f", "worker target module 'a..b' is not a dotted name"),
        ("pkg.class:f", "worker target module 'pkg.class' is not a dotted name"),
    ],
)
async def test_a_malformed_target_string(target: str, message: str) -> None:
    error = await refused(target)
    assert str(error) == message
    assert isinstance(error, ValueError)  # a bad argument
    assert error.target == target


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            LAMBDAS[0],
            (
                f"worker target {HERE}.<lambda> is a lambda, which a worker cannot "
                f"import by name: {TOP_LEVEL}"
            ),
        ),
        (
            make_closure(),
            (
                f"worker target {HERE}.make_closure.<locals>.inner is defined inside a "
                f"function, which a worker cannot import by name: {TOP_LEVEL}"
            ),
        ),
        (
            Holder().method,
            (
                "worker target Holder.method is a bound method, which a worker cannot "
                f"call without its object: {TOP_LEVEL}"
            ),
        ),
        (
            Holder.method,
            (
                f"worker target {HERE}.Holder.method is a method, which a worker cannot "
                f"call without its object: {TOP_LEVEL}"
            ),
        ),
        (
            sync_target,
            (
                f"worker target '{HERE}:sync_target' is not an async function (it is a "
                f"plain function): {NOT_ASYNC}"
            ),
        ),
        (
            TWIN_COPY,
            (
                f"worker target {HERE}:twin does not name the function given: "
                f"{HERE}.twin is another object (a decorator that does not use "
                "functools.wraps, or a name bound again)"
            ),
        ),
        (
            42,
            (
                "worker target must be 'package.module:function' or an async function, "
                "not 42"
            ),
        ),
    ],
    ids=["lambda", "closure", "bound method", "method", "sync", "not itself", "int"],
)
async def test_a_function_object_a_worker_cannot_import(
    target: object, message: str
) -> None:
    assert str(await refused(target)) == message


async def test_a_partial_is_not_a_function() -> None:
    error = await refused(functools.partial(_examples.echo))
    assert str(error).startswith(
        "worker target must be 'package.module:function' or an async function, "
        "not functools.partial(<function echo at 0x"
    )


async def test_an_installed_function_object_runs_spawned_and_forked() -> None:
    async with open_worker(_examples.echo, sandbox=BASIC) as worker:
        await worker.channel.send(Message(b"by reference"))
        assert (await worker.channel.receive()).payload == b"by reference"
    assert worker.returncode == 0
    async with (
        open_zygote(preload=[_examples.echo], sandbox=BASIC) as zygote,
        open_worker(_examples.echo, zygote=zygote) as forked,
    ):
        assert zygote.preloaded == (EXAMPLES,)
        await forked.channel.send(Message(b"forked"))
        assert (await forked.channel.receive()).payload == b"forked"


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "spawned"])
async def test_a_pool_takes_a_function_object(zygote: bool) -> None:
    async with open_worker_pool(
        _examples_pool.upper, workers=1, sandbox=BASIC, zygote=zygote
    ) as pool:
        assert (await pool.run(Message(b"hello"))).payload == b"HELLO"


def _run_script(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a program of the user's, as they would: ``python main.py``, its
    directory first on ``sys.path`` (which ``nox`` turns off for the tests)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONSAFEPATH"}
    return subprocess.run(
        [PYTHON, *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


MYTOOL = """
async def work(channel):
    async for message in channel:
        await channel.send(message)
"""

MAIN = """
import trio, trio_mojo
{define}

async def main():
    async with trio_mojo.open_worker(work, sandbox=trio_mojo.SandboxPolicy.basic()):
        pass

if __name__ == "__main__":
    trio.run(main)
"""


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    traceback = result.stderr.strip().splitlines()
    # One exception: no "During handling..." or "direct cause" chain.
    assert sum(line.startswith("Traceback") for line in traceback) == 1
    return traceback[-1]


def test_a_module_next_to_the_script_fails_in_one_line(tmp_path: Path) -> None:
    """The first error of issue #13: before, 82 lines ending in
    ModuleNotFoundError, with no word about isolated mode."""
    (tmp_path / "mytool.py").write_text(MYTOOL)
    (tmp_path / "main.py").write_text(MAIN.format(define="from mytool import work"))
    assert _last_line(_run_script(tmp_path, "main.py")) == (
        "trio_mojo.WorkerTargetError: worker target module 'mytool' is not "
        f"importable by {PYTHON} -I: no module named 'mytool' on its sys.path "
        f"{ISOLATED}; this process imports it from {tmp_path}/mytool.py){INSTALL}"
    )


def test_a_function_of_the_script_itself_is_refused(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(MAIN.format(define=MYTOOL))
    assert _last_line(_run_script(tmp_path, "main.py")) == (
        "trio_mojo.WorkerTargetError: worker target work is defined in __main__ "
        "(the script being run), which a worker cannot import: move it into an "
        "installed module"
    )
    # Run as ``python -m main``, the module has a name worth suggesting.
    assert _last_line(_run_script(tmp_path, "-m", "main")).endswith(
        "move it into an installed module, or name it as 'main:work'"
    )


@pytest.mark.parametrize("as_function", [False, True], ids=["string", "function"])
async def test_a_module_only_this_process_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_function: bool
) -> None:
    module = f"only_here_{as_function}"
    (tmp_path / f"{module}.py").write_text(MYTOOL)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        target = importlib.import_module(module).work
        error = await refused(target if as_function else f"{module}:work")
    finally:
        del sys.modules[module]
    assert str(error) == (
        f"worker target module {module!r} is not importable by {PYTHON} -I: no "
        f"module named {module!r} on its sys.path {ISOLATED}; this process imports "
        f"it from {tmp_path}/{module}.py){INSTALL}"
    )
    assert error.target == f"{module}:work"


NOT_IMPORTABLE = {
    "top level": (
        "trio_mojo_no_such_module:main",
        (
            f"no module named 'trio_mojo_no_such_module' on its sys.path {ISOLATED})"
            f"{INSTALL}"
        ),
    ),
    "submodule": (
        "trio_mojo.no_such_module:main",
        f"package 'trio_mojo' ({trio_mojo.__file__}) has no module 'no_such_module'",
    ),
    "not a package": (
        f"{EXAMPLES}.sub:main",
        f"'{EXAMPLES}' ({_examples.__file__}) is a module, not a package",
    ),
}


@pytest.mark.parametrize(
    ("reason", "how"),
    [
        *((reason, "spawned") for reason in NOT_IMPORTABLE),
        ("top level", "forked"),
        ("submodule", "pool"),
        ("not a package", "preload"),
    ],
)
async def test_a_module_the_interpreter_cannot_import(reason: str, how: str) -> None:
    target, why = NOT_IMPORTABLE[reason]
    module = target.partition(":")[0]
    what = "zygote preload module" if how == "preload" else "worker target module"
    before = children()
    with pytest.raises(WorkerTargetError) as info:
        await _enter(_start(how, target if how != "preload" else module))
    assert (
        str(info.value) == f"{what} {module!r} is not importable by {PYTHON} -I: {why}"
    )
    _one_clean_line(info.value)
    assert children() == before


def _start(how: str, target: str) -> AbstractAsyncContextManager[object]:
    if how == "spawned":
        return open_worker(target, sandbox=BASIC)
    if how == "pool":
        return open_worker_pool(target, workers=2, sandbox=BASIC)
    if how == "preload":
        return open_zygote(preload=[target], sandbox=BASIC)
    return _forked(target)


async def _enter(block: AbstractAsyncContextManager[object]) -> None:
    async with block:
        pytest.fail("the block must not run")


@asynccontextmanager
async def _forked(target: str, **options: Any) -> AsyncIterator[Worker]:
    async with (
        open_zygote(sandbox=BASIC, **options) as zygote,
        open_worker(target, zygote=zygote) as worker,
    ):
        yield worker


async def test_an_interpreter_without_trio_mojo(tmp_path: Path) -> None:
    bare = tmp_path / "python"  # an interpreter that has never heard of trio_mojo
    bare.write_text(f'#!/bin/sh\nexec {sys.base_prefix}/bin/python3 -S "$@"\n')
    bare.chmod(0o755)
    with pytest.raises(WorkerError) as info:
        async with open_worker(f"{EXAMPLES}:echo", sandbox=BASIC, python=bare):
            pytest.fail("the block must not run")
    assert not isinstance(info.value, WorkerTargetError)
    assert str(info.value) == (
        f"{bare} -I -m trio_mojo._workers._bootstrap --find-module exited with "
        f"status 1: {sys.base_prefix}/bin/python3: Error while finding module "
        "specification for 'trio_mojo._workers._bootstrap' (ModuleNotFoundError: "
        "No module named 'trio_mojo') (is trio_mojo installed in that "
        "interpreter's environment?)"
    )


HOOK = """
import importlib.machinery, sys

class EditableFinder:
    # As setuptools' editable installs do: a name served from outside sys.path.
    def find_spec(self, name, path=None, target=None):
        if name == "editable_module":
            return importlib.machinery.PathFinder.find_spec(name, [{hidden!r}])
        return None

sys.meta_path.append(EditableFinder())
"""


def _interpreter_with_a_hook(tmp_path: Path) -> str:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "editable_module.py").write_text(MYTOOL)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "editable_hook.py").write_text(HOOK.format(hidden=str(hidden)))
    script = tmp_path / "python-with-a-hook"
    code = (
        f"import runpy, sys; sys.path.append({str(hooks)!r}); import editable_hook; "
        "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
    )
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "-I -m" ] || exit 64\n'
        'module="$3"\nshift 3\n'
        f'exec {PYTHON} -I -c "{code}" "$module" "$@"\n'
    )
    script.chmod(0o755)
    return str(script)


async def test_a_module_an_import_hook_serves_is_asked_about(tmp_path: Path) -> None:
    python = _interpreter_with_a_hook(tmp_path)
    for _ in range(2):  # the second time, from what was learnt
        async with open_worker(
            "editable_module:work", sandbox=BASIC, python=python
        ) as worker:
            await worker.channel.send(Message(b"hooked"))
            assert (await worker.channel.receive()).payload == b"hooked"
    error = await refused("editable_nothing:work", python=python)
    assert "no module named 'editable_nothing' on its sys.path" in str(error)


# ----------------------------------------------------------------------
# In the worker (or the zygote): what only the import can tell


def _reported(spec: str, reason: str) -> str:
    return f"worker target {spec!r} {reason}"


WORKER_SIDE = {
    "missing": (
        f"{EXAMPLES}:no_such_target",
        _reported(
            f"{EXAMPLES}:no_such_target",
            f"does not exist: module '{EXAMPLES}' ({_examples.__file__}) has no "
            "attribute 'no_such_target'",
        ),
    ),
    "sync": (
        f"{EXAMPLES}:_socket_creator",
        _reported(
            f"{EXAMPLES}:_socket_creator",
            f"is not an async function (it is a plain function): {NOT_ASYNC}",
        ),
    ),
    "not callable": (
        f"{EXAMPLES}:SYSCALL_ATTEMPTS",
        _reported(
            f"{EXAMPLES}:SYSCALL_ATTEMPTS",
            f"is not an async function (it is an object of type dict): {NOT_ASYNC}",
        ),
    ),
    "raises on import": (
        "zygote_broken_preload:main",
        (
            "worker target module 'zygote_broken_preload' raised RuntimeError: this "
            "preload is broken on purpose when {where} imported it (at "
            f"{TESTS}/zygote_broken_preload.py:5)"
        ),
    ),
}
"""Each problem only an import can tell, and its message."""


@pytest.mark.parametrize(
    ("problem", "forked"),
    [
        *((problem, False) for problem in WORKER_SIDE),
        ("missing", True),
        ("raises on import", True),
    ],
)
async def test_the_worker_reports_what_only_its_import_tells(
    tmp_path: Path, problem: str, forked: bool
) -> None:
    target, message = WORKER_SIDE[problem]
    python = interpreter(tmp_path)  # finds zygote_broken_preload
    before = children()
    with pytest.raises(WorkerTargetError) as info:
        await _enter(
            _forked(target, python=python)
            if forked
            else open_worker(target, sandbox=BASIC, python=python)
        )
    error = info.value
    assert str(error) == message.format(where="the worker")
    assert error.returncode == TARGET_FAILED_EXIT
    assert error.target == target
    _one_clean_line(error)
    if problem == "raises on import":  # the import's traceback went to the tail
        assert "Traceback (most recent call last)" in error.stderr_tail
        assert error.stderr_tail.endswith(
            "RuntimeError: this preload is broken on purpose\n"
        )
    assert children() == before


@pytest.mark.parametrize("problem", ["sync", "raises on import"])
async def test_the_zygote_reports_what_only_its_preload_tells(
    tmp_path: Path, problem: str
) -> None:
    target, message = WORKER_SIDE[problem]
    before = children()
    with pytest.raises(WorkerTargetError) as info:
        await _enter(open_zygote(python=interpreter(tmp_path), preload=[target]))
    assert str(info.value) == message.format(where="the zygote")
    assert info.value.returncode == 1
    _one_clean_line(info.value)
    assert children() == before


@pytest.mark.parametrize("zygote", [True, False], ids=["zygote", "spawned"])
async def test_a_pool_fails_once_on_a_function_its_module_lacks(zygote: bool) -> None:
    target = "trio_mojo._examples_pool:no_such_function"
    before = children()
    with pytest.raises(WorkerTargetError) as info:
        async with open_worker_pool(target, workers=3, sandbox=BASIC, zygote=zygote):
            pytest.fail("the block must not run")
    assert str(info.value) == _reported(
        target,
        "does not exist: module 'trio_mojo._examples_pool' "
        f"({_examples_pool.__file__}) has no attribute 'no_such_function'",
    )
    _one_clean_line(info.value)
    assert children() == before


# ----------------------------------------------------------------------
# Workers that fail: no internal exception in what the user sees


async def test_a_worker_that_dies_shows_no_end_of_channel() -> None:
    async def body(worker: Worker) -> None:
        await worker.channel.send(Message(b"5"))
        await worker.channel.receive()  # EndOfChannel: the worker died

    worker, error = await worker_block_error(
        WorkerError, lambda: open_worker(f"{EXAMPLES}:crash", sandbox=BASIC), body
    )
    assert str(error).startswith(f"worker pid {worker.pid} died (exit status 5)")
    assert shown_chain(error) == [error]


async def test_a_worker_that_dies_before_it_is_ready_shows_no_end_of_channel(
    tmp_path: Path,
) -> None:
    dying = tmp_path / "dying-python"  # says what it imports, then dies at once
    dying.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *--find-module=*) exec {PYTHON} "$@";; esac\n'
        "echo 'dying at once' >&2; exit 3\n"
    )
    dying.chmod(0o755)
    with pytest.raises(WorkerError) as info:
        async with open_worker(f"{EXAMPLES}:echo", sandbox=BASIC, python=dying):
            pytest.fail("the block must not run")
    error = info.value
    assert (
        str(error)
        .splitlines()[0]
        .endswith("exited before it was ready (exit status 3)")
    )
    assert error.stderr_tail == "dying at once\n"
    assert shown_chain(error) == [error]


async def test_a_pool_request_whose_worker_died_shows_no_end_of_channel() -> None:
    async with open_worker_pool(
        "trio_mojo._examples_pool:faulty", workers=1, sandbox=BASIC
    ) as pool:
        with pytest.raises(WorkerError) as info:
            await pool.run(Message(b"crash 3"))
        reply = await pool.run(Message(b"still serving?"))
        assert reply.payload == b"still serving?"
    chain = shown_chain(info.value)
    assert [type(error) for error in chain] == [WorkerError, WorkerError]
    assert "died before answering this request" in str(chain[0])
    assert "died (exit status 3)" in str(chain[1])


async def test_a_hung_worker_of_a_pool_shows_no_internal_error() -> None:
    async with open_worker_pool(
        "trio_mojo._examples_pool:faulty",
        workers=1,
        sandbox=BASIC,
        request_timeout=0.5,
    ) as pool:
        with pytest.raises(WorkerError) as info, trio.fail_after(30):
            await pool.run(Message(b"hang"))
    assert "sent no reply within 0.5 s and was killed" in str(info.value)
    assert shown_chain(info.value) == [info.value]


# ----------------------------------------------------------------------
# The walk down a dotted name, without importing (``_importable``)


def test_the_walk_follows_packages_and_namespace_packages(tmp_path: Path) -> None:
    for part in ("one", "two"):  # a namespace package in two places
        (tmp_path / part / "spaced" / "inner").mkdir(parents=True)
        (tmp_path / part / "spaced" / "inner" / "__init__.py").write_text("")
    (tmp_path / "two" / "spaced" / "leaf.py").write_text("raise SystemExit\n")
    path = [str(tmp_path / "one"), str(tmp_path / "two")]
    assert locate("spaced", path) == "a namespace package"
    assert locate("spaced.leaf", path) == str(tmp_path / "two/spaced/leaf.py")
    assert locate("spaced.inner", path) == str(
        tmp_path / "one/spaced/inner/__init__.py"
    )
    with pytest.raises(NotImportableError) as info:
        locate("spaced.nothing", path)
    assert str(info.value) == (
        "package 'spaced' (a namespace package) has no module 'nothing'"
    )
    assert "spaced" not in sys.modules  # nothing was imported
    assert locate("sys", [], frozenset({"sys"})) == "built-in"
    with pytest.raises(NotImportableError, match="'sys' is a built-in module"):
        locate("sys.path", [], frozenset({"sys"}))


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[]",
        '{"path": [], "suffixes": [], "builtin": []}',
        '{"path": [1], "suffixes": [], "builtin": [], "other_finders": false}',
        (
            '{"path": [], "suffixes": [], "builtin": [], "other_finders": false,'
            ' "modules": {"m": {"origin": "x", "missing": "y"}}}'
        ),
    ],
)
def test_an_answer_that_is_not_one_is_refused(line: str) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_answer(line)


def test_an_answer_round_trips() -> None:
    answer = parse_answer(_importable.answer([EXAMPLES, "trio_mojo_nothing"]))
    assert answer.view.path == tuple(sys.path)
    assert answer.view.is_like_this_process()
    assert answer.origins == {EXAMPLES: _examples.__file__}
    assert answer.missing == {
        "trio_mojo_nothing": "no module named 'trio_mojo_nothing' on its sys.path"
    }
