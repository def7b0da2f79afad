"""``python -m lora_daemon …`` (installed) or ``python <extension>/daemon …`` (a plain folder): the ``lora-daemon`` CLI."""
if __package__:
    from .cli import main
else:  # run as a folder: register it as `lora_daemon` first (see bootstrap.py)
    import importlib.util
    import sys
    from pathlib import Path

    # Python put this folder first on sys.path, where queue.py would shadow the standard library's `queue`
    # (urllib3, which gradio imports, needs the real one): our modules are reached as `lora_daemon.*` instead.
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    _spec = importlib.util.spec_from_file_location("lora_daemon_bootstrap", Path(__file__).resolve().parent / "bootstrap.py")
    _bootstrap = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bootstrap)
    _bootstrap.import_lora_daemon()
    from lora_daemon.cli import main

raise SystemExit(main())
