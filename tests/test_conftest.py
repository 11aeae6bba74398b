"""The shared fixtures keep what one test leaves behind from slowing down the next."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest


def _torch_imported(_: int) -> bool:
    return "torch" in sys.modules


@pytest.fixture(scope="module")
def app_test_has_run(tmp_path_factory) -> None:
    """An AppTest of a script that imports torch, as app.py does, run before the test."""
    from streamlit.testing.v1 import AppTest

    script: Path = tmp_path_factory.mktemp("app") / "imports_torch.py"
    script.write_text("import streamlit as st\nimport torch\n\nst.write(torch.__version__)\n")
    assert not AppTest.from_file(str(script), default_timeout=60).run().exception


def test_a_process_spawned_after_an_app_test_does_not_run_its_script(app_test_has_run):
    """Run again in a spawned process, app.py would import torch and load the model: 0.8 s becomes 19 s."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(_torch_imported, [0]) == [False]
