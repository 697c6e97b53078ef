"""`python -m server --help`."""

import sys

from .cli import main

sys.exit(main())
