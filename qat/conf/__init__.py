"""Hydra configs (groups as folders; recipes in recipe/), read through pkg://qat.conf."""
