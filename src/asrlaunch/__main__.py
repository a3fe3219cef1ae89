"""`python -m asrlaunch COMMAND ...` is `asrlaunch COMMAND ...`; `torchrun -m asrlaunch train ...` too."""

import sys

from asrlaunch.cli.main import main

sys.exit(main())
