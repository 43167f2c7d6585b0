"""``python -m msgfm.doctor``: see msgfm/doctor/__init__.py."""
import sys

from msgfm.doctor import main

sys.exit(main())
