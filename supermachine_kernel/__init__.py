"""supermachine-kernel: run Python in snapshot-restored microVMs, from Python and from Jupyter."""
