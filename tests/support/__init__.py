"""Shared helpers for the test suite: free ports, bounded waits, real peer processes."""
