"""``python -m otcclip`` = the ``otcclip`` command."""

import sys

from otcclip.cli import main

sys.exit(main())
