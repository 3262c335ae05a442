"""``python -m cutremain_monai.cli``: the same as ``cutremain``."""

import sys

from cutremain_monai.cli import main

sys.exit(main())
