"""Service VMs: isolated workers that do every conversion of untrusted layer data."""
