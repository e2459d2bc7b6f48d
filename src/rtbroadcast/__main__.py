"""``python -m rtbroadcast``: the same as the ``rtbroadcast`` command."""

import sys

from ._cli import main

sys.exit(main())
