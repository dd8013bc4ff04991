"""Reports: what one rollout did, node by node, read from the site's history."""
