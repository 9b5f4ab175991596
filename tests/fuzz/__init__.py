"""Coverage-guided fuzz targets, runnable with and without atheris.

Each target module (``decoder``, ``encoder``, ``broker``, ``report``) states
its rule in the first line of its docstring and checks it on every input:

* ``open_target(workdir)`` is a context manager that prepares what the
  target needs (a directory tree, ``tracemalloc``) and yields the function
  that runs one input, ``one_input(data: bytes) -> None``; it raises
  (``AssertionError`` or the unexpected exception) when the rule is broken;
* the input bytes are read with :class:`fuzz._input.FuzzInput`, not with
  atheris' data provider, so an input means the same thing to the fuzzer
  and to the replay in the default test run (``tests/test_fuzz_corpus.py``),
  which needs no atheris.

``tests/fuzz/run.py`` drives atheris (``nox -s fuzz -- --minutes N``);
``tests/fuzz/seeds.py`` writes the hand-made seed inputs into
``tests/corpus/<target>/``.
"""
