"""The master's domain: pure (no I/O, no clocks, no asyncio, no ZooKeeper).

- `state.WorkState`: what the journal says, changed only by applying events.
- `scheduler.Scheduler`: the worker slots, their kinds and credits, and which
  slot runs which attempt (the one owner of "who runs what"; volatile: a new
  master learns it again from the workers).
- `master.Master`: the decisions. Each takes the state, the scheduler, its
  input and the time, records events (applied to the state at once) and
  effects (messages to send, results to publish); the shell performs the
  effects only once the events they depend on are durable.
"""
