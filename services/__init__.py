"""The swarm's services: the generic model wrapper and the shared daemon plumbing."""
