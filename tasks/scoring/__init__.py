"""Scoring: versioned scorers over (request, output), the LLM judge, the registry, and comparisons."""
