"""The web dashboard: a process of its own that talks to frontends over
their public API with each visitor's token, and serves an overview, works,
and a live tail of results to a browser (dashboard/app.py)."""
