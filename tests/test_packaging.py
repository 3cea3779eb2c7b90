"""What `pip install loraforge` gives a user: the version, dependency bounds that work, a complete sdist."""

import importlib.metadata
import re

import pytest

import loraforge
from loraforge.cli import main


def test_version_is_printed_and_is_the_installed_one(capsys):
    """Soak: `loraforge --version` was "error: the following arguments are required: command" and the package had
    no __version__; pyproject.toml now reads the version from loraforge.__version__."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert (e.value.code, capsys.readouterr().out) == (0, f"loraforge {loraforge.__version__}\n")
    assert re.fullmatch(r"\d+\.\d+\.\d+", loraforge.__version__)
    assert importlib.metadata.version("loraforge") == loraforge.__version__

