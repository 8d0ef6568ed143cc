"""``python -m train``: see ``python -m train --help``."""

import sys

from train.cli import main

sys.exit(main())
