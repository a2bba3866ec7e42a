import sys

from sgsc.cli import main

sys.exit(main())
