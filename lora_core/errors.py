"""The base of every error that means "the input is wrong, here is what to fix" (config, dataset, model files).

Entry points catch `InputError` to print the message alone — no traceback — and exit with `EXIT_CONFIG`; anything
else is a bug or an environment failure and keeps its traceback in the log.
"""


class InputError(ValueError):
    pass
