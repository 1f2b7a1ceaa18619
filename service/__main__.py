"""``python -m service`` runs the service, like ``device-rebind run``."""

import sys

from service.cli import main

raise SystemExit(main(sys.argv[1:] or ["run"]))
