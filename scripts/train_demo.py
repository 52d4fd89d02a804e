#!/usr/bin/env python3
"""Train the demo model from scratch: a small SD3.5-layout MMDiT and a TAESD-layout VAE (16 latent channels) that
draw the simple scenes of ``demo_scenes.py`` ("a red circle top left, white background") at 128x128.

    .venv/bin/python scripts/train_demo.py          # ~25 min on a 2-core CPU: demo/sd3.5_demo.safetensors
    .venv/bin/python scripts/train_demo.py --quick --out OUT   # a few steps of every stage (the tests)

Everything runs through ComfyUI's own code, so the model is what ComfyUI loads:
  1. the text conditioning comes from ComfyUI's SD3 text path (CLIPLoader type sd3) on the random CLIP-L of
     ``tiny_sd35.clip_l_state_dict`` (a hash of its tensors is written into the checkpoint: a torch whose random
     generator drew a different CLIP-L is caught, not silently used);
  2. the VAE is ComfyUI's TAESD module (encoder + decoder trained on 64x64 crops of rendered scenes);
  3. the MMDiT is ComfyUI's ``OpenAISignatureMMDITWrapper`` with the config ComfyUI detects from the SD3.5 Large
     key layout (3 joint blocks, hidden 192, qk RMSNorm), trained with the rectified-flow objective ComfyUI's
     SD3 sampling assumes (x_t = (1-s) x0 + s n, the model predicts n - x0, timestep = 1000 s, shift 3).
Deterministic: fixed seeds, 2 threads, deterministic algorithms; the same machine gives the same tensors and metadata
(the file's bytes may differ: safetensors writes the header's metadata in no fixed order).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import demo_scenes  # noqa: E402
import tiny_sd35  # noqa: E402

DEMO_CKPT = os.path.join(REPO, "demo", "sd3.5_demo.safetensors")
CLIP_DEFAULT = os.path.join(REPO, ".cache", "models", "text_encoders", "tiny_clip_l.safetensors")
DEPTH = 3
POS_MAX = 32  # pos_embed grid: up to 512x512 images
SHIFT = 3.0  # ComfyUI's SD3 sampling shift
VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609  # SD3's latent format: the TAESD raw latent is the model's latent


def comfy_import(comfy_dir: str):
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.options
    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.cli_args  # noqa: F401
    sys.argv = saved


def tensors_sha256(path: str) -> str:
    """A hash of a safetensors file's tensors (names, dtypes, shapes, bytes in name order), not of its bytes: the same
    weights written by another safetensors version hash the same."""
    import torch
    from safetensors import safe_open
    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        for k in sorted(f.keys()):
            t = f.get_tensor(k).contiguous()
            h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------- text
def encode_prompts(clip_path: str, prompts: list[str]):
    """ComfyUI's SD3 text path on the random CLIP-L: (context [N, 77, 768] of CLIP-L features, pooled [N, 768]).
    The rest of ComfyUI's 4096 / 2048 features are zeros without CLIP-G and T5 (added back by ``full_cond``)."""
    import torch
    import comfy.sd
    clip = comfy.sd.load_clip([clip_path], clip_type=comfy.sd.CLIPType.SD3)
    ctx, pooled = [], []
    for p in prompts:
        c, pl = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        assert c.shape[-1] == 4096 and float(c[..., 768:].abs().max()) == 0.0, "unexpected SD3 conditioning layout"
        ctx.append(c[0, :, :768].float())
        pooled.append(pl[0, :768].float())
    return torch.stack(ctx), torch.stack(pooled)


def full_cond(ctx, pooled):
    import torch.nn.functional as F
    return F.pad(ctx, (0, 4096 - ctx.shape[-1])), F.pad(pooled, (0, 2048 - pooled.shape[-1]))


# ----------------------------------------------------------------------------------------------------------- VAE
def images_tensor(imgs):
    import numpy as np
    import torch
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0


def colour_path_init(vae) -> None:
    """Start the autoencoder as a working one: channels 0-2 carry the colour from the image through the encoder
    (averaged 2x2 by each strided conv) to latent channels 0-2 (centred on 0) and back through the decoder
    (nearest-neighbour upsampling), so at step 0 it already reproduces each 8x8 patch's mean colour; every residual
    block starts as the identity (last conv zero). Training then learns the shapes' edges in the other channels."""
    import torch
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    for m in vae.modules():
        if type(m).__name__ == "Block":
            torch.nn.init.zeros_(m.conv[4].weight)
            torch.nn.init.zeros_(m.conv[4].bias)

    def colour(conv, taps, scale=1.0, bias=None):
        with torch.no_grad():
            conv.weight[:3].zero_()
            for c in range(3):
                for (i, j) in taps:
                    conv.weight[c, c, i, j] = scale / len(taps)
            if conv.bias is not None:
                conv.bias[:3] = 0.0 if bias is None else bias
    convs_e = [m for m in enc if isinstance(m, torch.nn.Conv2d)]
    colour(convs_e[0], [(1, 1)])
    for c in convs_e[1:-1]:  # the strided downsampling convs
        colour(c, [(1, 1), (1, 2), (2, 1), (2, 2)])
    colour(convs_e[-1], [(1, 1)], 2.0, -1.0)  # latent = 2 * colour - 1
    convs_d = [m for m in dec if isinstance(m, torch.nn.Conv2d)]
    colour(convs_d[0], [(1, 1)], 0.5, 0.5)  # back to [0, 1]
    for c in convs_d[1:]:
        colour(c, [(1, 1)])


def train_vae(steps: int, batch: int, rnd: random.Random, scenes, crop: int = 64, lr0: float = 1e-3):
    """ComfyUI's TAESD (16 channels) on ``crop``-pixel crops of rendered scenes (it is convolutional: crops teach it
    the same thing as whole images, faster); the shapes' pixels weigh more than the background's; the latent is
    kept near unit variance and the decoder learns to tolerate a little noise in it."""
    import torch
    from comfy.taesd.taesd import TAESD
    vae = TAESD(latent_channels=16)
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv2d):  # ComfyUI's layers skip their init: torch's default
            torch.nn.Conv2d.reset_parameters(m)
    colour_path_init(vae)
    params = list(vae.taesd_encoder.parameters()) + list(vae.taesd_decoder.parameters())
    opt = torch.optim.Adam(params, lr=lr0)
    size = demo_scenes.SIZE
    for step in range(steps):
        lr = lr0 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for gr in opt.param_groups:
            gr["lr"] = lr
        imgs = []
        for _ in range(batch):
            sc = rnd.choice(scenes)
            im = demo_scenes.render(sc, rnd)
            # crops around the shape half of the time (most of a scene is background)
            cx, cy = demo_scenes.POSITIONS[sc[2]]
            if rnd.random() < 0.5:
                y = min(max(int(cy * size) - crop // 2 + rnd.randrange(-16, 17, 8), 0), size - crop) // 8 * 8
                x = min(max(int(cx * size) - crop // 2 + rnd.randrange(-16, 17, 8), 0), size - crop) // 8 * 8
            else:
                y, x = rnd.randrange(0, size - crop + 1, 8), rnd.randrange(0, size - crop + 1, 8)
            imgs.append(im[y:y + crop, x:x + crop])
        x = images_tensor(imgs)
        z = vae.taesd_encoder(x)
        zn = z + 0.1 * torch.randn_like(z)  # the decoder sees slightly noisy latents: sampled latents are not exact
        rec = vae.taesd_decoder(zn)
        bg = x.flatten(2).median(-1).values[..., None, None]
        w = 1.0 + 4.0 * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
        loss_rec = (w * ((rec - x).abs() + (rec - x).square())).mean() / w.mean()
        loss_lat = (z.square().mean() - 1.0).square() + z.mean().square()
        loss = loss_rec + 0.1 * loss_lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step}/{steps}: reconstruction {float(loss_rec):.4f}, latent std {float(z.std()):.3f}")
    vae.vae_scale.data.fill_(VAE_SCALE)
    vae.vae_shift.data.fill_(VAE_SHIFT)
    return vae.eval()


# --------------------------------------------------------------------------------------------------------- MMDiT
def build_mmdit(seed: int):
    """ComfyUI's MMDiT with the config it detects from our SD3.5 Large-layout keys; DiT-style init (zero
    modulation and output, fixed 2D sin-cos positions)."""
    import numpy as np
    import torch
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper, get_2d_sincos_pos_embed
    sd = {k: v.float() for k, v in tiny_sd35.mmdit_state_dict(DEPTH, "large", seed, POS_MAX, prefix="").items()}
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    cfg.pop("image_model", None)
    torch.manual_seed(seed)
    for k in sd:
        if "adaLN_modulation" in k or k.startswith("final_layer.linear"):
            sd[k].zero_()
        elif k.endswith(".weight") and sd[k].dim() == 2:
            torch.nn.init.xavier_uniform_(sd[k])
        elif k.endswith(".bias"):
            sd[k].zero_()
    D = 64 * DEPTH
    pe = get_2d_sincos_pos_embed(D, POS_MAX)
    sd["pos_embed"] = torch.from_numpy(np.asarray(pe, np.float32)).reshape(1, POS_MAX * POS_MAX, D)
    model = OpenAISignatureMMDITWrapper(**cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    model.load_state_dict(sd)
    return model


def sample_sigmas(n: int, g):
    import torch
    s = torch.sigmoid(torch.randn(n, generator=g))
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def train_mmdit(model, latents, cond_idx, ctx, pooled, steps: int, batch: int, seed: int, drop: float = 0.1):
    """Rectified flow on (latent, prompt) pairs; prompt index 0 is the empty prompt (classifier-free guidance)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=6e-4, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    warm = max(1, steps // 20)
    t0 = time.time()
    for step in range(steps):
        lr = 6e-4 * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        idx = torch.randint(0, latents.shape[0], (batch,), generator=g)
        x0 = latents[idx]
        ci = cond_idx[idx].clone()
        ci[torch.rand(batch, generator=g) < drop] = 0
        c, y = full_cond(ctx[ci], pooled[ci])
        s = sample_sigmas(batch, g)
        n = torch.randn(x0.shape, generator=g)
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * n
        out = model(xt, s * 1000.0, context=c, y=y)
        loss = (out - (n - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        if step % 100 == 0 or step == steps - 1:
            log(f"mmdit {step}/{steps}: loss {float(loss):.4f} lr {lr:.2e} ({time.time() - t0:.0f} s)")
    model.load_state_dict(ema)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEMO_CKPT, help="the checkpoint to write (default: %(default)s)")
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_DIR", os.path.join(REPO, ".comfyui")))
    ap.add_argument("--clip", default=CLIP_DEFAULT,
                    help="the random CLIP-L (written when missing)")
    ap.add_argument("--vae-steps", type=int, default=300)
    ap.add_argument("--images", type=int, default=3000, help="training images for the MMDiT")
    ap.add_argument("--steps", type=int, default=1700, help="MMDiT training steps")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a few steps of every stage (tests)")
    a = ap.parse_args(argv)
    if a.quick:
        a.vae_steps, a.images, a.steps, a.batch = 3, 16, 3, 8
    comfy_import(a.comfy)
    import torch
    from safetensors.torch import save_file
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(a.seed)
    t_start = time.time()

    tiny_sd35.write_clip_l(a.clip)
    train, held = demo_scenes.split()
    prompts = [""] + [demo_scenes.prompt_of(*s) for s in train]
    log(f"{len(train)} training scenes, {len(held)} held out; encoding {len(prompts)} prompts with ComfyUI's SD3 "
        "text path")
    if a.quick:
        prompts = prompts[:4]
        train = train[:3]
    ctx, pooled = encode_prompts(a.clip, prompts)
    log(f"text done ({time.time() - t_start:.0f} s)")

    rnd = random.Random(a.seed)
    vae = train_vae(a.vae_steps, 16, rnd, train)
    log(f"VAE done ({time.time() - t_start:.0f} s)")

    lat, cidx = [], []
    with torch.no_grad():
        for i in range(0, a.images, 32):
            chunk = [rnd.randrange(len(train)) for _ in range(min(32, a.images - i))]
            x = images_tensor([demo_scenes.render(train[j], rnd) for j in chunk])
            lat.append(vae.taesd_encoder(x))
            cidx += [j + 1 for j in chunk]
    latents, cond_idx = torch.cat(lat), torch.tensor(cidx)
    log(f"{latents.shape[0]} latents encoded: std {float(latents.std()):.3f} ({time.time() - t_start:.0f} s)")

    model = train_mmdit(build_mmdit(a.seed), latents, cond_idx, ctx, pooled, a.steps, a.batch, a.seed)
    log(f"MMDiT done ({time.time() - t_start:.0f} s)")

    sd = {"model.diffusion_model." + k: v.detach().to(torch.bfloat16).contiguous()
          for k, v in model.state_dict().items()}
    for k, v in vae.state_dict().items():
        sd["first_stage_model." + k] = v.detach().to(torch.float16 if v.dim() else torch.float32).contiguous()
    meta = {"modelspec.title": "SD3.5-layout demo model (simple shapes, 128x128), trained by sd35-fp8",
            "modelspec.description": "a coloured shape at a position on a plain background: "
                                     + demo_scenes.prompt_of("red", "circle", "top left", "white"),
            "sd35fp8.demo": "1", "sd35fp8.demo.clip_l_tensors_sha256": tensors_sha256(a.clip),
            "sd35fp8.demo.train": f"vae_steps={a.vae_steps} images={a.images} steps={a.steps} batch={a.batch} "
                                  f"seed={a.seed} torch={torch.__version__}"}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tmp = a.out + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, a.out)
    log(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.1f} MB, tensors sha256 {tensors_sha256(a.out)[:16]}) in "
        f"{time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
