"""``python -m services.control``: the ``swarm`` command (services.control.cli)."""

import sys

from services.control.cli import main

sys.exit(main())
