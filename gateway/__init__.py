"""NSW message-exchange gateway."""

__version__ = "0.1.0"
