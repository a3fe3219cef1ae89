"""`python launch/status.py ...` is `asrlaunch status ...`, under the name users already know."""

import sys

from asrlaunch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["status", *sys.argv[1:]]))
