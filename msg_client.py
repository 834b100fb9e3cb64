"""``python msg_client.py -user X.p12 askqueue``: the original service's entry point, now ``msg-client``."""

import sys

from client.cli import main

if __name__ == "__main__":
    sys.exit(main())
