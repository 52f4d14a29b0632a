"""Schemas, sample documents and the document-type registry (``registry.yaml``), shipped as package data.

``SCHEMAS_DIR`` is this folder, whether the gateway runs from a checkout or is installed.
"""

from __future__ import annotations

from pathlib import Path

SCHEMAS_DIR: Path = Path(__file__).resolve().parent

__all__ = ["SCHEMAS_DIR"]
