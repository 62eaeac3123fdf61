"""``python -m otcclip`` = the ``otcclip`` command."""

import sys

from otcclip.service.cli import main

sys.exit(main())
