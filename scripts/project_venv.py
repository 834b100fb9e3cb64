"""Run a repository script under the project's ``.venv``, which holds the dependencies, so that
``python msg_client.py ...`` (and the other scripts) work from a plain shell, without activating it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
_GUARD = "MSG_RELAY_VENV_REEXEC"  # set across the exec, so a virtualenv that is not what it seems cannot loop


def use_project_venv(script: str) -> None:
    """Re-execute ``script`` under ``.venv/bin/python`` unless that is what runs it (or it does not exist)."""
    if os.environ.pop(_GUARD, None) or Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if python.exists():
        os.environ[_GUARD] = "1"
        os.execv(python, [str(python), str(Path(script).resolve()), *sys.argv[1:]])
