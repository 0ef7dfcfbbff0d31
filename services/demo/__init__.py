"""`popbridge demo`: the single-process pipeline (services.single) against throwaway servers on loopback.

A composition root like services.single: it imports that runner and the services; nothing in `services`
imports it (services.cli loads its command lazily, by name).
"""
