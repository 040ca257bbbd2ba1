"""Benchmarks behind ``vist2 bench``: each module measures one thing and reports JSON."""
