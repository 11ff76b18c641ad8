"""One module per service; a service's activities are the methods of its class."""
