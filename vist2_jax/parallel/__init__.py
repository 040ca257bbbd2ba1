"""Parallelism: the logical-axis rules table and mesh construction."""
