"""`python -m sts.cli ...` (what torchrun and accelerate launch run): the `sts` command."""

import sys

from sts.cli.commands import main

sys.exit(main())
