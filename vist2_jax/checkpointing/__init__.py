"""Checkpointing: Orbax checkpoints of a run (``checkpoints``) and loading a run back (``runs``)."""
