"""`python -m loraforge ...` (and `torchrun -m loraforge train ...`)."""

import sys

from loraforge.cli import main

sys.exit(main())
