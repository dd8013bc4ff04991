"""The cloud path: a fleet of Nova servers in a Heat stack, images in Glance, through clouds.yaml."""
