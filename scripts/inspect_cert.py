#!/usr/bin/env python3
"""Inspect a certificate, keystore or CRL: the same code as ``msg-pki inspect``."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
_GUARD = "MSG_RELAY_VENV_REEXEC"  # set across the exec, so a virtualenv that is not what it seems cannot loop


def use_project_venv() -> None:
    """Re-run this script under the project's ``.venv``, which holds the dependencies, so that
    ``python scripts/inspect_cert.py ...`` works from a plain shell, without activating it first."""
    if os.environ.pop(_GUARD, None) or Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if python.exists():
        os.environ[_GUARD] = "1"
        os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    use_project_venv()
    sys.path.insert(0, str(ROOT))
    try:
        from pki.cli import main
    except ImportError as exc:  # no virtualenv, or one without the dependencies
        print(f"inspect_cert.py: {exc}: run make install first", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["inspect", *sys.argv[1:]]))
