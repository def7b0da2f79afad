"""lora-scripts companion daemon: takes training jobs over ZeroMQ, records them in SQLite, trains in child processes.

Kept import-light on purpose: the WebUI process imports `lora_daemon.client` and `lora_daemon.protocol` with only pyzmq
installed, so nothing here may pull in torch, sqlite-utils or `lora_core`.
"""
__version__ = "0.1.0"
