"""Release images: the store, their manifests, packing and comparing them."""
