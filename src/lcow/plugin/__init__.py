"""The Docker graph-driver plugin server (``lcow serve``)."""
