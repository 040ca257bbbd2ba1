"""Export to PyTorch: ``exporter`` (JAX/Orbax side, streaming) writes a folder that
``torch_vist2`` (torch + transformers only, no JAX) loads and runs. Import nothing here:
the PyTorch runtime must not pull the exporter's JAX imports."""
