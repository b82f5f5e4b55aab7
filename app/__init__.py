"""paramserver: a parameter server with exact Keras 2.2 optimizer semantics."""

__version__ = "0.1.0"
