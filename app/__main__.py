"""``python -m paramserver.server serve`` is ``paramserver serve``."""

import sys

from .cli import main

sys.exit(main())
