"""The agent registry: services register, heartbeat and are discovered by capability."""
