"""Ahead-of-time compiles of a recipe's real train step for a TPU slice, from any host."""
