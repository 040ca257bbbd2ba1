"""Attention under the vision-as-memory mask: the jnp reference and the kernel entry point."""
