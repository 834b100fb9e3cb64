#!/usr/bin/env python3
"""Inspect a certificate, keystore or CRL: the same code as ``msg-pki inspect``."""

import sys

if __name__ == "__main__":
    from project_venv import ROOT, use_project_venv

    use_project_venv(__file__)
    sys.path.insert(0, str(ROOT))
    try:
        from pki.cli import main
    except ImportError as exc:  # no virtualenv, or one without the dependencies
        print(f"inspect_cert.py: {exc}: run make install first", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["inspect", *sys.argv[1:]]))
