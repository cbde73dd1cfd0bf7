"""Limits of a work's options, apart from validation (which needs the
generated code): job processes check @job options with them and import
nothing else."""

MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT_SECONDS = 24 * 3600.0
MAX_DELAY_SECONDS = 366 * 24 * 3600.0  # how far ahead a work may be scheduled, and the longest back-off
MAX_PRIORITY = 1000  # priorities run from -MAX_PRIORITY to MAX_PRIORITY
MAX_BACKOFF_MULTIPLIER = 100.0
MAX_RATE_LIMIT = 1_000_000.0  # starts per second of a kind
