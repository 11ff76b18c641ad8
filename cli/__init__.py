"""The `fleetflow` command line: the CLI, the device simulator and the status screen."""
