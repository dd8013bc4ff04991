"""The local site: an image store's releases unpacked, and nodes made of namespaces."""
