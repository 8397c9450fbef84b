import sys

from tifactory.cli import main

sys.exit(main())
