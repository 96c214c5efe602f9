"""``python -m vmctl.cli``."""

import sys

from vmctl.cli.main import main

sys.exit(main())
