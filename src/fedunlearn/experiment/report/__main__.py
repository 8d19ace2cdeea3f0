"""``python -m fedunlearn.experiment.report``: see :mod:`fedunlearn.experiment.report.cli`."""

import sys

from .cli import main

sys.exit(main())
