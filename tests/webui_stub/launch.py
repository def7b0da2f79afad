"""A1111's launch module as install.py sees it: is_installed and run_pip (which records instead of installing)."""
import importlib.metadata
import importlib.util

pip_commands = []


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    pip_commands.append(command)
