"""`python -m tok1d.cli COMMAND [flags]`: the `tok1d` tool."""

from tok1d.cli import app

if __name__ == "__main__":
    app.exit_process(app.main())
