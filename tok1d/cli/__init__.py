"""The command line: the `tok1d` tool (`tok1d.cli.app`) and its commands, one module each
(train, prepare, tokenize, sample, evaluate, convert, bench), plus the demo pipeline (demo)."""
