"""Component kits: sets of random-init models of the real classes (``random``: real size; ``tiny``: small)."""
