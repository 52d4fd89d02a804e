"""Every node of the pack explains itself in the editor: a one-line tooltip on every input and output (from
/object_info, as the frontend reads them) and a help page (web/docs/<NodeId>.md, served through WEB_DIRECTORY
where ComfyUI's node docs panel fetches it) that covers every input and output."""
import re

import pytest
import requests

from comfy_harness import PACK_NAME, ComfyServer

pytestmark = pytest.mark.comfy
NODES = ("SD35FP8CheckpointLoader", "SD35FP8Calibrate", "SD35FP8Autocast", "SD35FP8SaveCheckpoint",
         "SD35FP8PromptBatch", "SD35FP8CompareImages")


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    srv = ComfyServer(str(tmp_path_factory.mktemp("models")), workdir=str(tmp_path_factory.mktemp("comfy")),
                      env={"SD35FP8_API_ENABLED": "0"})
    srv.start()
    try:
        data = requests.get(srv.base + "/object_info").json()
        pages = {n: requests.get(f"{srv.base}/extensions/{PACK_NAME}/docs/{n}.md") for n in NODES}
        images = {}
        for page in pages.values():
            for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", page.text):
                images[ref] = requests.get(f"{srv.base}/extensions/{PACK_NAME}/docs/{ref}")
        yield data, pages, srv.log_text(), images
    finally:
        srv.stop()


def test_the_pack_has_exactly_these_nodes(info):
    assert sorted(k for k in info[0] if k.startswith("SD35FP8")) == sorted(NODES)


@pytest.mark.parametrize("node", NODES)
def test_one_line_tooltips_on_every_input_and_output(info, node):
    d = info[0][node]
    inputs = {**d["input"].get("required", {}), **d["input"].get("optional", {})}
    for name, spec in inputs.items():
        tip = (spec[1] if len(spec) > 1 else {}).get("tooltip", "")
        assert tip and "\n" not in tip and len(tip) <= 100, f"{node}.{name}: tooltip {tip!r}"
    tips = d.get("output_tooltips") or []
    assert len(tips) == len(d["output_name"]) and all(t and len(t) <= 100 for t in tips), (node, tips)


@pytest.mark.parametrize("node", NODES)
def test_help_page_covers_every_input_and_output(info, node):
    page = info[1][node]
    assert page.status_code == 200, f"{node}: no help page served ({page.status_code})"
    text = page.text
    assert text.startswith("# " + info[0][node]["display_name"])
    d = info[0][node]
    names = [*d["input"].get("required", {}), *d["input"].get("optional", {}), *d["output_name"]]
    missing = [n for n in names if not re.search(rf"\*\*{re.escape(n)}\*\*", text)]
    assert not missing, f"{node}'s help page does not explain {missing}"


def test_help_pages_show_the_bundled_workflow(info):
    images = info[3]
    assert "workflow.jpg" in images and all(r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff"
                                            for r in images.values())


def test_service_can_be_turned_off(info):
    assert "sd35fp8 service: off" in info[2]


def test_rarely_used_knobs_are_advanced_inputs(info):
    """The recipe knobs that matter only for uncalibrated models, TransformerEngine or a tuning session sit behind
    the frontend's advanced toggle; what a user sets every day does not."""
    def advanced(node):
        d = info[0][node]["input"]
        return {k for part in ("required", "optional") for k, spec in d.get(part, {}).items()
                if len(spec) > 1 and spec[1].get("advanced")}
    assert advanced("SD35FP8Autocast") == {"fp8_format", "amax_history_len", "margin", "backend", "attention",
                                           "scaling"}
    assert advanced("SD35FP8Calibrate") == {"method", "percentile"}
    assert advanced("SD35FP8CheckpointLoader") == set()
