"""The package's version, recorded in every checkpoint and training run (a module of its own,
so that the modules recording it need not import the package's facade, ``mirage_demo``)."""

__version__ = "0.1.0"
