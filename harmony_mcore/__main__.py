import sys

from harmony_mcore.cli import main

sys.exit(main())
