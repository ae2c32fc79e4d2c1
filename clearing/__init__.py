"""The reference clearing receiver: accepts signed settlement batches over HTTP, verifies them and
stores each record once (``store.py`` is its only SQL)."""
