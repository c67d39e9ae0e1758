"""python -m server: the same as charstream-serve."""

import sys

from server.main import main

sys.exit(main())
