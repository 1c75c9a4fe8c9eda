"""``python -m memrope``: the ``memrope`` command line (:mod:`memrope.runtime.cli`)."""

import sys

from memrope.runtime.cli import main

sys.exit(main())
