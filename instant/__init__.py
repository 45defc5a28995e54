"""Instant recovery: a recovery point's disk served over NBD from the vault, then hydrated."""
