"""Photos before the network: decoding (`decode`), person boxes (`boxes`) and the files given beside a photo (`sidecars`)."""
