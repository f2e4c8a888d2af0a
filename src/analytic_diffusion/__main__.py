"""`python -m analytic_diffusion` is the `ads` command."""

import sys

from .cli import main

sys.exit(main())
