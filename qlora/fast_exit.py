"""End a finished command's process without the interpreter's teardown.

When `python train.py` or `qlora <command>` has written and closed everything, CPython's finalization
still clears every module and runs full garbage collections over the millions of objects torch,
transformers and triton create at import: about 1.3 s on a 2-core CPU after the imports alone (0.26 s
when those objects are left out of the collections), a thirtieth of the embedded default's run. The
exit handlers still run (logging's flush and close, wandb, temporary folders), then the process ends.

It is done only where nothing else is at work: a non-daemon thread other than qlora's idle CPU
workers (a library's upload, a pool we do not own) gets the interpreter's usual join and teardown.
QLORA_FULL_EXIT=1 always takes the usual path.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

from qlora.kernels.native import POOL_THREAD_PREFIX


def exit_process(status: int = 0) -> NoReturn:
    """sys.exit(status), skipping the interpreter's teardown when that is safe (see the module)."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's (and PyPy's) own, for this job
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon
            and not t.name.startswith(POOL_THREAD_PREFIX)]
    if busy or run_exit_handlers is None or os.environ.get("QLORA_FULL_EXIT", "") not in ("", "0"):
        sys.exit(status)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or replaced by something without flush
            pass
    os._exit(status)
