"""The callback registry of A1111's modules/script_callbacks.py, reduced to the callbacks lora-scripts uses."""
callback_map = {"ui_tabs": [], "ui_settings": [], "app_started": [], "script_unloaded": [], "before_reload": []}


def on_ui_tabs(callback, *, name=None):
    callback_map["ui_tabs"].append(callback)


def on_ui_settings(callback, *, name=None):
    callback_map["ui_settings"].append(callback)


def on_app_started(callback, *, name=None):
    callback_map["app_started"].append(callback)


def on_script_unloaded(callback, *, name=None):
    callback_map["script_unloaded"].append(callback)


def on_before_reload(callback, *, name=None):
    callback_map["before_reload"].append(callback)


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def ui_tabs_callback():
    tabs = []
    for callback in callback_map["ui_tabs"]:
        tabs += callback() or []
    return tabs


def ui_settings_callback():
    for callback in callback_map["ui_settings"]:
        callback()


def app_started_callback(demo, app):
    for callback in callback_map["app_started"]:
        callback(demo, app)


def script_unloaded_callback():
    for callback in callback_map["script_unloaded"]:
        callback()


def before_reload_callback():
    for callback in callback_map["before_reload"]:
        callback()
