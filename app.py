"""MIRAGE OCT demo: ``python app.py`` serves the bundled demo model (see README.md).

``python app.py --checkpoint DIR_OR_HUB_ID`` serves another checkpoint (repeat the option for
a model picker); on a Hugging Face Space set ``MIRAGE_DEMO_CHECKPOINTS`` instead.
"""

import spaces  # noqa: F401  (first: on a ZeroGPU Space it patches torch before CUDA is touched)

from mirage_demo.ui import main

if __name__ == "__main__":
    main()
