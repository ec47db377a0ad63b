"""The provider router (port 6103): capability routing, local-first fallback, cost tracking.

Not built yet: see the router issue. The package exists so that the layout shows it.
"""
