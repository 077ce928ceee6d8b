"""Dagster wiring: thin asset definitions over the plain-Python stage modules."""
