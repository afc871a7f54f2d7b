"""`python -m tunedeck.cli`: the same as the `tunedeck` command."""
import sys

from .main import main

sys.exit(main())
