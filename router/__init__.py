"""The provider router (port 6103): capability routing, local-first fallback, cost tracking.

Its pieces, each with one job:

- ``app``: the app factory; the lifespan builds the pieces below.
- ``routes``, ``dashboard``: the HTTP API and the cost dashboard.
- ``service``: ``Router``, what the routes use: capabilities, decisions, the chat call.
- ``directory``: the registry's passing agents, read in the background.
- ``candidates``: who may serve a capability, best first.
- ``load``: what the router measured of each endpoint (latency, calls open).
- ``breaker``: a circuit per endpoint.
- ``forward``: one chat call's walk over its candidates: retries, fallbacks, the stream relay.
- ``upstream``: the upstream call's one interface, and the local agents behind it.
- ``cloud``: keyed cloud providers behind the same interface (OpenAI, Anthropic).
- ``errors``: what an upstream's failure means to the walk and the circuits.
- ``accounting``: what a call leaves behind: metrics, route and cloud call records.
- ``usage``, ``metrics``, ``ratelimit``, ``settings``: the ledger, Prometheus, the limit,
  the profile.
"""
