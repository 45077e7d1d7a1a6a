"""The `tokenprobe` command line: `main` (parser, entry point), `args` (shared), subcommands."""
