"""Admin: rollouts."""
