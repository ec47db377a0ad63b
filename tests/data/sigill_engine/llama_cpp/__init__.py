"""The installed llama_cpp, except that a decode kills the process with SIGILL, as a llama.cpp
build with instructions the CPU cannot run does. Put this folder first on PYTHONPATH."""

import os
import signal
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
del sys.modules[__name__]
import llama_cpp as _installed  # noqa: E402 - the real package, now that this folder is off the path


def _decode_with_an_illegal_instruction(self, tokens):
    os.kill(os.getpid(), signal.SIGILL)


_installed.Llama.eval = _decode_with_an_illegal_instruction
sys.modules[__name__] = _installed
