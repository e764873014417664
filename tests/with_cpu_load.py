"""Run a command while every core is kept busy: the browser tests must pass on a loaded machine.

    python tests/with_cpu_load.py [--hogs N] COMMAND...

Starts N processes (default: one per core) that multiply matrices with torch at normal
priority, as a training job next to the suite does, runs COMMAND, stops them and exits
with COMMAND's status. `make test-stress` runs the browser tests this way.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HOG = """
import torch
torch.set_num_threads(1)
a = torch.randn(384, 384)
while True:
    a = torch.tanh(a @ a)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2,
                        help="busy processes to run beside the command (default: one per core)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the command to run under load")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
    print(f"with_cpu_load: {args.hogs} busy processes beside: {' '.join(args.command)}", flush=True)
    try:
        return subprocess.call(args.command)
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


if __name__ == "__main__":
    sys.exit(main())
