"""Command-line front end: `llamapy SUBCOMMAND ...`."""
