"""Diagnostics of rank collapse, gradient flow and attention statistics per layer (``diagnostics``), and their
figures (``plotting``, needs matplotlib: ``pip install "hf_gpam[diagnostics]"``)."""
