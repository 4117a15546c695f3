"""`python -m hf_repair.cli`: the same as the `hf-repair` console script."""

import sys

from .command import main

sys.exit(main())
