"""The documentation site builds from the docstrings with every warning an error.

Sphinx runs with ``-W`` and ``nitpicky``: a docstring reference to a name that does
not exist, a malformed docstring or a README section the pages include that has moved
fails this test, and with it CI.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path: pathlib.Path) -> None:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"sphinx-build failed:\n{done.stderr[-6000:]}"
    assert (tmp_path / "api.html").exists()
