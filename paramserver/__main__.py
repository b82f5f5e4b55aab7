"""``python -m paramserver serve`` is ``paramserver serve``."""

import sys

from paramserver.server.cli import main

sys.exit(main())
