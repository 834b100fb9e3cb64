"""``python msg_server.py ...``: the original service's entry point, now ``msg-server``."""

import sys

from server.cli import main

if __name__ == "__main__":
    sys.exit(main())
