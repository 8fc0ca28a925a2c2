"""What a user of the library relies on besides the code: one version, read the same everywhere,
the type information shipped, the licence and citation files present."""
import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.version import Version

import glancefocus

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_one_pep440_string_used_everywhere():
    version = glancefocus.__version__
    assert str(Version(version)) == version
    # the release notes and the citation name it
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()
    assert f"\nversion: {version}\n" in (ROOT / "CITATION.cff").read_text()
    try:
        installed = importlib.metadata.version("glancefocus")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("glancefocus is not installed (only on PYTHONPATH)")
    assert installed == version, "reinstall (pip install -e .): the installed version is stale"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_pyproject_reads_the_version_and_ships_py_typed():
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["dynamic"]["version"] == {"attr": "glancefocus.__version__"}
    assert "py.typed" in setuptools["package-data"]["glancefocus"]
    assert (Path(glancefocus.__file__).parent / "py.typed").is_file()
    assert pyproject["project"]["license"] == "MIT"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
