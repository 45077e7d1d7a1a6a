"""`python -m tokenprobe.cli`: the `tokenprobe` command."""
import sys

from tokenprobe.cli.main import main

sys.exit(main())
