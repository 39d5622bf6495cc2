"""gpt-oss in pure PyTorch: config, checkpoint reading, layers, MoE, transformer, tiny-checkpoint writer.

Never imports ray, fastapi or pydantic (tests/test_boundaries.py).
"""
