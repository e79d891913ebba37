"""Step 2: attention per role (capture through the kernel), retrieval heads (eq. 3) and steering (eq. 1)."""
