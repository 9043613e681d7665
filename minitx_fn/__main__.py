import sys

from minitx_fn.cli import main

sys.exit(main())
