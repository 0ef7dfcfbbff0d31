"""The chaos suite: the whole pipeline as an operator runs it, under seeded faults (issue 13).

`python -m tests.chaos --seed N --messages M --duration S --json out.json`; see README "Tests".
"""
