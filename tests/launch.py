"""How the tests launch ``torchrun``: two processes of one thread each (2 cores), importing the
pyro_vae under test.

``PYTHONPATH`` names this checkout: the ranks are new interpreters, which would otherwise
import whichever pyro_vae is installed (from another worktree, an editable install points
elsewhere). Test files import these as ``from launch import ...`` (``tests/`` is on ``sys.path``,
see :mod:`helpers`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: torchrun with two processes on this machine, as a command to extend with ``-m pyro_vae ...``
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
_TESTED = str(Path(__file__).resolve().parent.parent)
#: its environment: one thread a process, unbuffered output, this checkout first on the path
TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [_TESTED, os.environ.get("PYTHONPATH")]))}
