"""HTTP plumbing shared by every daemon of the swarm (registry, router, wrappers)."""
