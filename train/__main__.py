"""``python -m train``: see ``python -m train --help``."""

import sys

from train.train import main

sys.exit(main())
