import sys

from fetchml.cli.main import main

sys.exit(main())
