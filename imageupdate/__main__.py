"""``python -m imageupdate`` is the ``imageupdate`` command."""

import sys

from imageupdate.cli.main import main

sys.exit(main())
