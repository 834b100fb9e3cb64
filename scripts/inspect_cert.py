#!/usr/bin/env python3
"""Inspect a certificate, keystore or CRL: the same code as ``msg-pki inspect``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pki.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
