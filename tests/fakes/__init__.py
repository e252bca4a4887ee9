"""Stand-ins for what tests cannot have (a GPU server) and for injected faults."""
