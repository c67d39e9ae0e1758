"""`python -m export` is charstream-export."""

import sys

from export.cli import main

sys.exit(main())
