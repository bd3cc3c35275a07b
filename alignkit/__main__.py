"""``python -m alignkit`` (and ``accelerate launch -m alignkit``): the `alignkit` command."""
import sys

from alignkit.cli import main

sys.exit(main())
