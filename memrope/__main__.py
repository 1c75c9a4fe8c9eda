import sys

from memrope.cli import main

sys.exit(main())
