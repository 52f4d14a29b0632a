"""Routing engine: pure functions of a message's header and business fields."""
