import sys

from vlmops.cli.main import main

sys.exit(main())
