"""python -m server: the same as charstream-serve."""

import sys

from server.main import main

if __name__ == "__main__":  # the engine process (spawned) imports this module again
    sys.exit(main())
