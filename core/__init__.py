"""The kernel every Parley package builds on: settings, database, models, jobs, logging, crypto.

``core`` imports nothing else of Parley's.
"""
