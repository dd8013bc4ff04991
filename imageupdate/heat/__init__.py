"""Heat: the ephemeral local Heat (config, server process, service), the client, and the chain template."""
