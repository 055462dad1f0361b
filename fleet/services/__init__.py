"""Writes of the fleet app, one module per area. Services are keyword-only and transactional."""
