"""A1111's launch module as install.py sees it: is_installed, and run_pip, which prints the pip command it was
given (A1111 prints "Installing ..." and runs pip; here nothing is installed, so tests can read what would be)."""
import importlib.metadata
import importlib.util


def is_installed(package):
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    print(f"run_pip: {command}", flush=True)
