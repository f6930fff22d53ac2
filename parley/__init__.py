"""The composition root: ``create_app()``, worker wiring, the ``parley`` CLI, embedded services."""
