"""``python -m qcourse`` runs the ``qcourse`` command."""
import sys

from qcourse.course.cli import main

sys.exit(main())
