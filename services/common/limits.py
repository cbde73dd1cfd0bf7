"""Limits of a work's options, apart from validation (which needs the
generated code): job processes check @job options with them and import
nothing else."""

MAX_ATTEMPTS_LIMIT = 100
MAX_TIMEOUT_SECONDS = 24 * 3600.0
