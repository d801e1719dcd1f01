import sys

from raytp.cli import main

sys.exit(main())
