import sys

from quota_sidecar.tools.launcher import main

sys.exit(main())
