"""Everything about the images a run learns from, before any model is loaded.

``scan`` finds images and their captions the way the trainer reads them (metadata.csv > sidecar > default caption >
folder tokens); ``buckets`` assigns aspect buckets; ``check`` reports problems by file name; ``prepare`` writes a
clean copy; ``captions`` edits captions; ``auto_label`` and ``captioners/`` write captions with a local model.
``python -m lora_core.dataset`` is the command line (``cli``). Imports only ``lora_core.errors``/``events`` from the
rest of the engine, so the daemon's dataset tools load without a model.
"""
