"""python -m course student OUT_DIR | grade [CHECKOUT]: the course kit (course/__init__.py)."""
import sys

from course import main

sys.exit(main())
