"""Admin: devices."""
