"""Helpers shared by the test suite: tiny random models and a direct paged-forward driver."""
