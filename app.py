"""MIRAGE OCT demo: ``python app.py`` serves the bundled demo model (see README.md).

``python app.py --checkpoint DIR_OR_HUB_ID`` serves another checkpoint (repeat the option for
a model picker); on a Hugging Face Space set ``MIRAGE_DEMO_CHECKPOINTS`` instead.
"""

from mirage_demo.ui import main

if __name__ == "__main__":
    main()
