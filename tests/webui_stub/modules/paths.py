"""WebUI paths: the stub WebUI lives in $WEBUI_STUB_ROOT."""
import os

script_path = data_path = os.environ["WEBUI_STUB_ROOT"]
models_path = os.path.join(data_path, "models")
