"""Export to PyTorch: ``exporter`` (JAX/Orbax side, streaming) writes a Hugging Face model
folder whose remote code (``bundle``: ``modeling_vist2`` and what it imports; torch +
transformers only, no JAX) loads and runs it. Import nothing here: the PyTorch runtime must
not pull the exporter's JAX imports."""
