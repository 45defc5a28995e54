import sys

from siterecovery.cli import main

sys.exit(main())
