"""The mechanisms every step shares: errors, configs, the model loader, the results writer, statistics, provenance, plots."""
