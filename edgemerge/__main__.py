import sys

from edgemerge.cli import main

sys.exit(main())
