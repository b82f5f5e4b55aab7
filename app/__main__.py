"""``python -m app serve`` is ``paramserver serve``."""

import sys

from .cli import main

sys.exit(main())
