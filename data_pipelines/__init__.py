"""Data pipelines: raw text -> rendered sketches -> rows of the DESIGN §2 row contract."""
