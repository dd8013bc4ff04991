"""The site's history: every rollout, node step, gate result and rollback, in SQLite."""
