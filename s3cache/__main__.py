"""``python -m s3cache``: the ``s3cache`` command."""

import sys

from s3cache.cli import main

sys.exit(main())
