"""``python msg_server.py ...``: the original service's entry point, now ``msg-server``."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
_GUARD = "MSG_RELAY_VENV_REEXEC"  # set across the exec, so a virtualenv that is not what it seems cannot loop


def use_project_venv() -> None:
    """Re-run this script under the project's ``.venv``, which holds the dependencies, so that
    ``python msg_server.py ...`` works from a plain shell, without activating it first."""
    if os.environ.pop(_GUARD, None) or Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if python.exists():
        os.environ[_GUARD] = "1"
        os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    use_project_venv()

try:
    from server.cli import main
except ImportError as exc:  # no virtualenv, or one without the dependencies
    if __name__ != "__main__":
        raise
    print(f"msg_server.py: {exc}: run make install first", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
