"""`python -m rlora_kernels.cli`: the same as the `rlora` command."""

import sys

from .main import main

sys.exit(main())
