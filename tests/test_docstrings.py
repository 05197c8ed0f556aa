"""The examples in the package's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import cluster_trainer

# Not modules to import: __main__ runs the CLI; chaos_job is a job file the chaos harness loads.
MODULES = sorted(
    info.name for info in pkgutil.walk_packages(cluster_trainer.__path__, "cluster_trainer.")
    if info.name not in ("cluster_trainer.__main__", "cluster_trainer.chaos_job")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed (output above)"
