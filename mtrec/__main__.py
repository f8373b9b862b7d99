"""``python -m mtrec`` (also what ``torchrun -m mtrec`` runs)."""

from mtrec.cli import run

run()
