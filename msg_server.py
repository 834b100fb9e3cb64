"""``python msg_server.py ...``: the original service's entry point, now ``msg-server``."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from project_venv import use_project_venv

    use_project_venv(__file__)

try:
    from server.cli import main
except ImportError as exc:  # no virtualenv, or one without the dependencies
    if __name__ != "__main__":
        raise
    print(f"msg_server.py: {exc}: run make install first", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
