"""The requester as a Knative Function: func-python calls ``new()`` and serves the instance's ASGI ``handle``."""

from .func import new

__all__ = ["new"]
