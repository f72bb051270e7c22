"""``python -m nucseg_d2.predict``: see :mod:`nucseg_d2.predict.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
