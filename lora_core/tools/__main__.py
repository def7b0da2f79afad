"""``python -m lora_core.tools …`` — see `lora_core.tools.cli`."""
from .cli import main

raise SystemExit(main())
