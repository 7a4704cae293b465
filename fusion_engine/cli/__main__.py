"""``python -m fusion_engine.cli``: the ``fusion-engine`` command."""
import sys

from .main import main

sys.exit(main())
