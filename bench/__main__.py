"""`python -m bench` (`make bench`): BPS against PostgreSQL's own floor, in one run. See bench/run.py."""

import sys

from .run import main

sys.exit(main())
