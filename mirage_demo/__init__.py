"""Fine-tune MIRAGE (a retinal OCT foundation model) and explain its predictions."""

__version__ = "0.1.0"

from mirage_demo import models  # noqa: F401  (registers the mirage_* timm models)
