"""`python -m server.ray --help`."""

import sys

from .cli import main

sys.exit(main())
