"""Rollout: plan the change, drive Heat through the chain, gate each node on its checks, roll back."""
