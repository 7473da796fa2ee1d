"""``python -m studio [--model SPEC]``."""

import sys

from studio.app import main

if __name__ == "__main__":
    sys.exit(main())
