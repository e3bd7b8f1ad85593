import sys

from switchkd.cli import main

sys.exit(main())
