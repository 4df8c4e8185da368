"""Legitimate populations: the background of ordinary customers, and trap shapes (automation,
reasoning requests and shared infrastructure that are not distillation)."""
