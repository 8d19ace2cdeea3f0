"""``python -m fedunlearn.experiment``: see :mod:`fedunlearn.experiment.runner`."""

from .runner import main

main()
