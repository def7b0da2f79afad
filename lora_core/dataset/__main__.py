"""``python -m lora_core.dataset check|prepare|captions …``: the dataset tools' command line (`lora_core.dataset.cli`)."""
from .cli import main

raise SystemExit(main())
