"""Use cases; each owns its database transactions."""
