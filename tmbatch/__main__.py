"""Allow `python -m tmbatch`, the same as the `tmbatch` console script."""

import sys

from tmbatch.cli.main import main

sys.exit(main())
