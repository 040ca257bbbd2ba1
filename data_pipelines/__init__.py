"""Data pipelines: raw text -> rendered sketches -> rows of the docs/design.md §2 row contract."""
