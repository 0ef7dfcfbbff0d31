"""The single-process composition root: `popbridge run` wires the three stages together on one log.

This package (like services.cli) may import several services; the services themselves never import it.
Only the demo (services.demo) builds on it.
"""
