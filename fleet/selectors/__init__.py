"""Reads of the fleet app, one module per area."""
