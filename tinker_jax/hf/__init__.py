"""Hugging Face formats at the boundary: the key table and weight loading, export, tokenizer, presets, init-model."""
