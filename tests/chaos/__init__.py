"""Chaos tests: one fault each, injected under numbered traffic on 127.0.0.1.

Each test asserts what the clients saw (close codes, resumes, every numbered message:
none lost, none twice, in order, where the design promises it; the documented outcome
where it does not), what the backend saw, and that sessions on another node, route or
backend were not affected. Each records its row (fault, load, sent, received, lost,
duplicated, other_sessions) with record_property for scripts/results_table.py.
CHAOS_SCALE (default 1) multiplies the number of sessions.
"""
