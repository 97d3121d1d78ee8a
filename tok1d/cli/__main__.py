"""`python -m tok1d.cli COMMAND [flags]`: the `tok1d` tool."""

import sys

from tok1d.cli import app

if __name__ == "__main__":
    sys.exit(app.main())
