"""`python launch/submit.py ...` is `asrlaunch submit ...`, under the name users already know."""

import sys

from asrlaunch.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
