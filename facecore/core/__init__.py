"""Plugins, registries, config and its schema, building parts, checkpoints, devices and RNG."""
