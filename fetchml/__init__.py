"""fetchml: run machine-learning experiments on your own GPU boxes."""

__version__ = "0.1.0"
