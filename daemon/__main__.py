"""``python -m lora_daemon …`` (installed) or ``python <extension>/daemon …`` (a plain folder): the ``lora-daemon`` CLI."""
if __package__:
    from .cli import main
else:  # run as a folder: register it as `lora_daemon` first (see bootstrap.py)
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", Path(__file__).resolve().parent / "bootstrap.py")
    _bootstrap = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)
    _bootstrap.import_lora_daemon()
    from lora_daemon.cli import main

raise SystemExit(main())
