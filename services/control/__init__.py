"""Running the whole swarm: which daemons a profile has, supervisord's config, health waits."""
