"""Verification: the checks that decide a node's gate."""
