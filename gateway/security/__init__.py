"""Hardened parsing, signature verification, trust decisions and signing."""
