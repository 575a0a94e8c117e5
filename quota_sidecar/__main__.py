import sys

from quota_sidecar.tools.cli import main

sys.exit(main())
