"""Harmony, gpt-oss's chat format: render, parse, tools, the grammar bridge for structured outputs."""
