"""The per-group bias report: group labels read from a file or folders, accuracy per group with bootstrap
intervals (`search.evaluate --groups`)."""
