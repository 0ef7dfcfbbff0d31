"""The single-process composition root: `popbridge run` and `popbridge demo` wire the three stages together.

This package (like services.cli) may import several services; the services themselves never import it.
"""
