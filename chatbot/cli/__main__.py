"""`python -m chatbot.cli ...` is `persona-studio ...` (what `torchrun -m` and `accelerate launch -m` run)."""

import sys

from . import main

sys.exit(main())
