"""GPT-NeoX-style Mixture-of-Experts pretraining framework."""
