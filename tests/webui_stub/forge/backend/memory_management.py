"""Forge's backend/memory_management.py: unload_all_models() takes every model off the GPU (Forge loads them again
on demand at the next generation); soft_empty_cache() returns the freed blocks. Calls are recorded next to the
stub A1111 calls (modules.sd_models.calls), with whether the generation lock was held."""
from modules import sd_models


def unload_all_models():
    sd_models._record("forge.unload_all_models")
    sd_models.on_gpu = False


def soft_empty_cache(force=False):
    sd_models._record("forge.soft_empty_cache")
