"""Validate workflow JSON (API and UI format) against a running server's /object_info."""
from __future__ import annotations

# combos whose options are the server's model files: the bundled workflows name the official files,
# which a test server does not have; check the shape of the value instead of membership
FILE_INPUTS = {"ckpt_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name", "unet_name"}


def _spec(info: dict, cls: str, name: str):
    for section in ("required", "optional"):
        s = info[cls]["input"].get(section, {})
        if name in s:
            return s[name]
    return None


def _combo_options(spec):
    t = spec[0]
    if isinstance(t, list):
        return t
    if t == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def _input_order(info: dict, cls: str) -> list[str]:
    order = info[cls].get("input_order")
    if order:
        return list(order.get("required", [])) + list(order.get("optional", []))
    inp = info[cls]["input"]
    return list(inp.get("required", {})) + list(inp.get("optional", {}))


def _types_match(a, b) -> bool:
    """Output/input types agree: "*" matches all, comma lists overlap; a combo (its option list, "COMBO" in the UI
    format) matches "COMBO" or the same options (ComfyUI's validator compares the lists)."""
    if a == "*" or b == "*":
        return True
    if isinstance(a, list) or isinstance(b, list):
        return a == b or "COMBO" in (a, b)
    return bool(set(a.split(",")) & set(b.split(",")))


def check_value(cls: str, name: str, spec, value) -> list[str]:
    errs = []
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    choices = _combo_options(spec)
    if choices is not None:
        if name in FILE_INPUTS:
            if not (isinstance(value, str) and value.endswith((".safetensors", ".sft", ".gguf", ".pt"))):
                errs.append(f"{cls}.{name}: {value!r} is not a model file name")
        elif value not in choices:
            errs.append(f"{cls}.{name}: {value!r} not in {choices}")
    elif t == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            errs.append(f"{cls}.{name}: {value!r} is not an INT")
        elif not (opts.get("min", -2**63) <= value <= opts.get("max", 2**64)):
            errs.append(f"{cls}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
    elif t == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            errs.append(f"{cls}.{name}: {value!r} is not a FLOAT")
        elif not (opts.get("min", -1e308) <= value <= opts.get("max", 1e308)):
            errs.append(f"{cls}.{name}: {value} outside [{opts.get('min')}, {opts.get('max')}]")
    elif t == "BOOLEAN":
        if not isinstance(value, bool):
            errs.append(f"{cls}.{name}: {value!r} is not a BOOLEAN")
    elif t == "STRING":
        if not isinstance(value, str):
            errs.append(f"{cls}.{name}: {value!r} is not a STRING")
    else:
        errs.append(f"{cls}.{name}: a {t} input needs a link, got the value {value!r}")
    return errs


def validate_api(wf: dict, info: dict) -> list[str]:
    errs = []
    for nid, node in wf.items():
        cls = node.get("class_type")
        if cls not in info:
            errs.append(f"node {nid}: unknown node type {cls!r}")
            continue
        required = set(info[cls]["input"].get("required", {}))
        missing = required - set(node["inputs"])
        if missing:
            errs.append(f"node {nid} ({cls}): missing required inputs {sorted(missing)}")
        for name, value in node["inputs"].items():
            spec = _spec(info, cls, name)
            if spec is None:
                errs.append(f"node {nid} ({cls}): unknown input {name!r}")
                continue
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                src = wf.get(value[0])
                if src is None:
                    errs.append(f"node {nid} ({cls}).{name}: links to missing node {value[0]}")
                    continue
                outs = info.get(src["class_type"], {}).get("output", [])
                if value[1] >= len(outs):
                    errs.append(f"node {nid} ({cls}).{name}: {src['class_type']} has no output {value[1]}")
                elif not _types_match(outs[value[1]], spec[0] if isinstance(spec[0], str) else _combo_options(spec)):
                    errs.append(f"node {nid} ({cls}).{name}: expects {spec[0]}, linked to {outs[value[1]]}")
            else:
                errs.extend(f"node {nid}: {e}" for e in check_value(cls, name, spec, value))
    return errs


def validate_ui(wf: dict, info: dict) -> list[str]:
    errs = []
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link in wf["links"]:
        lid, src, sslot, dst, dslot, typ = link
        if src not in nodes or dst not in nodes:
            errs.append(f"link {lid}: dangling ({src} -> {dst})")
            continue
        s_cls, d_cls = nodes[src]["type"], nodes[dst]["type"]
        if s_cls in info and sslot >= len(info[s_cls]["output"]):
            errs.append(f"link {lid}: {s_cls} has no output {sslot}")
        elif s_cls in info and not _types_match(info[s_cls]["output"][sslot], typ):
            errs.append(f"link {lid}: type {typ} but {s_cls} output {sslot} is {info[s_cls]['output'][sslot]}")
        d_in = nodes[dst]["inputs"][dslot] if dslot < len(nodes[dst]["inputs"]) else None
        if d_in is None or d_in.get("link") != lid:
            errs.append(f"link {lid}: target {d_cls} slot {dslot} does not reference it")
        elif d_cls in info:
            spec = _spec(info, d_cls, d_in["name"])
            if spec is None:
                errs.append(f"link {lid}: {d_cls} has no input {d_in['name']!r}")
            elif not _types_match(spec[0] if isinstance(spec[0], str) else "COMBO", typ):
                errs.append(f"link {lid}: {d_cls}.{d_in['name']} expects {spec[0]}, gets {typ}")
    for n in wf["nodes"]:
        cls = n["type"]
        if cls not in info:
            errs.append(f"node {n['id']}: unknown node type {cls!r}")
            continue
        # a slot-only input has no widget value; a widget fed by a link ("widget" in its input) keeps its value
        linked = {i["name"] for i in n.get("inputs", []) if "widget" not in i}
        widgets = []
        for name in _input_order(info, cls):
            spec = _spec(info, cls, name)
            if spec is None or name in linked:
                continue
            t = spec[0]
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets.append((name, spec))
        vals = list(n.get("widgets_values", []))
        for name, spec in widgets:
            if not vals:
                errs.append(f"node {n['id']} ({cls}): no widget value for {name!r}")
                break
            errs.extend(f"node {n['id']}: {e}" for e in check_value(cls, name, spec, vals.pop(0)))
            cag = spec[1].get("control_after_generate") if len(spec) > 1 and isinstance(spec[1], dict) else None
            # the frontend adds the control widget to INTs named seed/noise_seed unless told not to
            if cag or (cag is None and spec[0] == "INT" and name in ("seed", "noise_seed")):
                if not vals or vals.pop(0) not in ("fixed", "increment", "decrement", "randomize"):
                    errs.append(f"node {n['id']} ({cls}): {name} needs its control_after_generate value")
        if vals:
            errs.append(f"node {n['id']} ({cls}): {len(vals)} extra widget values {vals!r}")
    return errs
