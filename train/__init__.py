"""Training and evaluation CLI: ``python -m train`` and ``python -m train.evaluate``."""
