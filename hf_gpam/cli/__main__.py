"""``python -m hf_gpam.cli ...``: the ``hf-gpam`` command."""

import sys

from . import main


sys.exit(main())
