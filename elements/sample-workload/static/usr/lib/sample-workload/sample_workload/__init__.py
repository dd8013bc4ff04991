"""sample-workload: a tiny key-value HTTP service keeping its data on /mnt/state."""
