"""The embedded model host: the Ollama API subset the swarm uses, over llama-cpp-python.

``python -m services.modelhost --model smollm2:135m --port 11434`` serves one GGUF model
that installs from PyPI (see ``catalog``), so a fresh machine needs no Ollama (DESIGN
section 4). Laid out like llama-cpp-python's own ``server`` package: ``settings``,
``catalog`` (which models, where their files are), ``engine`` (the loaded model),
``routes`` (HTTP) and ``app`` (the factory).
"""
