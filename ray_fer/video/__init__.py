"""Video: decoding sampled frames (PyAV), tracks across frames, synthetic videos with a known truth."""
