"""`python launch/collect.py ...` is `asrlaunch collect ...`, under the name users already know."""

import sys

from asrlaunch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
