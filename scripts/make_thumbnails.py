#!/usr/bin/env python3
"""The template thumbnails (workflows/<name>.jpg, shown by ComfyUI's template browser), docs/workflow.png and the
help pages' web/docs/workflow.jpg, from
screenshots of the bundled workflows in the real frontend:

    mkdir -p /tmp/shots && SD35FP8_SCREENSHOTS=/tmp/shots .venv/bin/python -m pytest tests/e2e/test_frontend.py
    .venv/bin/python scripts/make_thumbnails.py /tmp/shots
"""
import os
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from service.config import TEMPLATES  # noqa: E402
GRAPH = (290, 150, 2110, 1000)  # the part of a 2400x1150 screenshot that shows the graph (no menus, no banner)


def main(shots: str) -> int:
    names = sorted(f[:-4] for f in os.listdir(shots) if f.endswith(".png"))
    if not names:
        raise SystemExit(f"{shots}: no screenshots (run the frontend test with SD35FP8_SCREENSHOTS={shots})")
    for name in names:
        img = Image.open(os.path.join(shots, name + ".png")).convert("RGB").crop(GRAPH)
        thumb = img.copy()
        thumb.thumbnail((640, 400))
        thumb.save(os.path.join(REPO, "workflows", name + ".jpg"), quality=85)
        if name == TEMPLATES["large"]:  # the README's picture and the node help pages'
            img.save(os.path.join(REPO, "docs", "workflow.png"), optimize=True)
            small = img.copy()
            small.thumbnail((1280, 800))
            small.save(os.path.join(REPO, "web", "docs", "workflow.jpg"), quality=82)
        print("wrote", name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/shots"))
