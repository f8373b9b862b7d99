"""``python -m mtrec`` (also what ``torchrun -m mtrec`` runs)."""

import sys

from mtrec.cli import main

sys.exit(main())
