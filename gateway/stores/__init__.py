"""Durable stores: the ledger (message status, duplicate claims, hash-chained audit log)."""
