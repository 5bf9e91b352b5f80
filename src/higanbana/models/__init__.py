"""Model builders: tiny configs of the real SD architectures for tests and the demo."""
