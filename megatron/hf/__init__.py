"""Bridges to Hugging Face `transformers`: GPT-NeoX weight mapping, and our own model shipped as remote code."""
