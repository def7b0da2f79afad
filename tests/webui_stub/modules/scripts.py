"""modules/scripts.py reduced to what an AlwaysVisible script uses: the Script base and the AlwaysVisible marker.
A1111 instantiates every Script subclass it finds in scripts/*.py and calls process(p) as each generation starts
and postprocess(p, processed) when it ends (see generate_like_webui.py)."""


class AlwaysVisible:
    pass


class Script:
    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass
