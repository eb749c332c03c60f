"""Canvas Token Broker: short-lived, endpoint-scoped, audited proxy credentials for Canvas."""
