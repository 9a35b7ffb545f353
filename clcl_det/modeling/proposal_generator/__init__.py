"""Proposal generators."""
from . import rpn  # noqa: F401  (registration)
