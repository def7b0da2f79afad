"""shared.opts (settings with add_option), OptionInfo and cmd_opts, as in A1111's modules/shared.py + options.py."""
import os
from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section

    def info(self, text):
        return self

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self):
        self.data = {}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in ("data", "data_labels"):
            raise AttributeError(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


opts = Options()
cmd_opts = SimpleNamespace(lora_dir=None, api_auth=None, gradio_auth=None,
                           device_id=os.environ.get("WEBUI_STUB_DEVICE_ID"))  # A1111's --device-id
state = SimpleNamespace(interrupted=False)  # shared.state: the Interrupt button sets `interrupted`
