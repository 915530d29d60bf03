import sys

from merging.cli import main

sys.exit(main())
