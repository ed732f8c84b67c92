"""`python -m dft_ds.sample ...` is `dft-sample ...`."""

import sys

from dft_ds.sample.cli import main

sys.exit(main())
