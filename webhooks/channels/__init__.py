"""Pure channel adapters: raw bytes → events, reply → HTTP request, HTTP error → error class.

Adapters never touch the database or read settings.
"""
