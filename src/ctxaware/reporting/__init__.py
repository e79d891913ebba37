"""Step 6: one HTML (and Markdown) report over any run directories."""
