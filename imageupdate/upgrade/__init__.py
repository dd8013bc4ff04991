"""Upgrade paths: release metadata, planning, state versions, migrations, snapshots, config checks."""
