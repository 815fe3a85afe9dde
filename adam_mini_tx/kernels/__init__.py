"""Single-pass kernels of the Adam-mini step (:mod:`.spec` says what every kernel computes)."""
