"""The ``vist2`` command line: one module per command group."""
