"""`python -m cli`: the `fleetflow` command."""

from cli.main import main

main()
