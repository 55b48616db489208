"""ACVTT: cross-view texture transfer for CT slice interpolation (numpy + torch only)."""

__version__ = "0.1.0"
