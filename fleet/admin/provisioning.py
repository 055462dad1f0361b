"""Admin: provisioning."""
