"""`python -m training` is `charstream-train`."""

import sys

from training.cli import main

sys.exit(main())
