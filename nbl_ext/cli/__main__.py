"""``python -m nbl_ext.cli``: the ``nbl`` command."""

import sys

from nbl_ext.cli import main

sys.exit(main())
