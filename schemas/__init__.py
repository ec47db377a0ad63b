"""Shapes shared by every daemon of the swarm, defined once.

Import from the submodules (``schemas.agents``, ``schemas.openai``, ...); this package
imports nothing eagerly so that a daemon pays only for what it uses.
"""
