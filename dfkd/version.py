"""The package's version, in a module of its own so that the file formats can stamp it without
importing the package's public face (``dfkd/__init__``)."""
__version__ = "0.2.0"
