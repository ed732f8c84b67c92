"""`python -m dft_ds.eval ...` is `dft-eval ...`."""

import sys

from dft_ds.eval.cli import main

sys.exit(main())
