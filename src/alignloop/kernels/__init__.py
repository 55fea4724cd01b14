"""Hand-written CPU kernels (`csrc/`) for the engine and the reward encoder, built on first use
(`native`)."""
