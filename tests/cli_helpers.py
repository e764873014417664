"""`persona-studio ...` in the test process: `main(argv)` with its output captured.

Cheaper than a subprocess (no interpreter, no torch import per call) and what
the entry point runs. The command opens its own store connections, as another
process would. A subprocess stays where it is the point: `serve`'s start-up
exit status, a job killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

from chatbot.cli import main


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the command; returns what a subprocess.run(..., capture_output=True, text=True) would."""
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "stdin", io.StringIO(stdin or "")), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(list(args))
        except SystemExit as exc:  # argparse: --help, a usage error (status 2)
            status = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["persona-studio", *args], status, out.getvalue(), err.getvalue())


def stop_worker(data_dir: Path) -> None:
    """Kill the job worker that holds ``data_dir``'s lock, if any. It runs detached (it outlives the
    server that started it) and waits minutes for more work: a test that started one stops it."""
    lock = Path(data_dir) / "worker.lock"
    pid = lock.read_text().strip() if lock.exists() else ""
    if pid.isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGKILL)  # its own session: the job's processes go with it
