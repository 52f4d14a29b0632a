"""Delivery adapters: one module per kind of destination, all behind ``adapters.base.Adapter``."""
