import sys

from trustswarm.cli import main

sys.exit(main())
