"""Engines: the Lite draft tier, the local high-fidelity tier and the cloud adapters, one file each,
all behind the `Engine` protocol of `tiers.base`."""
