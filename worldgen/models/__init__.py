"""Model code: the causal DiT, its rolling KV cache, attention backends, the VAE and the text encoder."""
