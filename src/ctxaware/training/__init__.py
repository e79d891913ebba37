"""Step 4: SFT with the indicator, the context-parametric inversion tracker, DPO and RLVR stages."""
