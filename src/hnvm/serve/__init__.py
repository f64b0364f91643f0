"""Serving trained runs: online user state (state.py), the durable event log (store.py) and
the HTTP service (app.py)."""
