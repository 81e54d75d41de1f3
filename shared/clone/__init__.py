"""The clone lifecycle, in one place. Celery tasks in ``workers/`` only parse arguments and call in.

    events.py        job events and the job's percent (what SSE, the CLI and the API read)
    retry.py         the one retry policy: attempts, backoff, waiting for a busy node
    faults.py        fault injection for tests and staging
    gate.py          opening and closing a step: stale runs, redelivery, cancel and skip gating, attempts
    sources.py       what "a source is restarted" means, and the one function that does it
    steps.py         the five step bodies, per source node
    neutralize.py    on_clone actions: what they are, which stack runs which, checking a request
    safety.py        the safety pass before a clone node first starts (actions, leak scan), the safety report
    runner.py        one step from claim to outcome (retry in N seconds, or done)
    outcome.py       when a job has succeeded, failed or been cancelled, and what is undone then
    control.py       cancel and retry requests, and preparing a job's next run
    supervision.py   the watchdog's rules for jobs: overdue sources, stalled jobs
"""
