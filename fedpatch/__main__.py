"""``python -m fedpatch``: the same command line as the ``fedpatch`` entry point."""

import sys

from fedpatch.cli import main

sys.exit(main())
