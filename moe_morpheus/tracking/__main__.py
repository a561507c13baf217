"""``python -m moe_morpheus.tracking sync RUN_FOLDER``: see :mod:`moe_morpheus.tracking.sync`."""

import sys

from moe_morpheus.tracking.sync import main

sys.exit(main())
