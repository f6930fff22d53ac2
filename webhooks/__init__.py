"""All channel I/O: webhook routes, intake (verify, parse, store, enqueue), channel adapters,
the send lane and the sandbox Graph API. Imports only ``core``."""
