"""The generic model wrapper: one implementation, one profile entry per model service."""
