"""Peak memory of `convert_checkpoint` on a full-size, release-shaped checkpoint (docs/performance.md).

    python scripts/measure_convert_memory.py [WORKDIR] [--dtype fp16|fp32]

Synthesizes (once, in WORKDIR) a checkpoint with the public release's exact shapes: the SDXL UNet's 140 attention
modules, K = 128 bases of rank 8, a 4-layer 1024-wide resampler, 16 ArcFace tokens, float16 (3.1 GB on disk).
Then converts it in a fresh process and prints the process's memory above its baseline (after imports): the
peak resident set (VmHWM: anonymous memory plus the resident pages of memory-mapped input files) and the peak of
anonymous memory alone (RssAnon, sampled from /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, sys, threading, time
import torch
from diffusers_hyperlora.io.convert import convert_checkpoint

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

base_rss, base_anon = status("VmRSS"), status("RssAnon")
peak = {"anon": base_anon}
stop = False

def sample():
    while not stop:
        peak["anon"] = max(peak["anon"], status("RssAnon"))
        time.sleep(0.005)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], dtype=sys.argv[3], progress=False)
seconds = time.perf_counter() - start
stop = True
thread.join()
print(json.dumps({"rss_above_baseline": status("VmHWM") - base_rss, "anon_above_baseline": peak["anon"] - base_anon,
                  "seconds": seconds}))
"""


def synthesize(folder: Path) -> None:
    """Write a release-layout folder with the release's shapes (random float16 weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_hyperlora import HyperLoRAConfig, HyperLoRAPredictor, save_release_checkpoint
    from diffusers_hyperlora.model.targets import targets_from_unet

    with torch.device("meta"):  # SDXL's UNet layout, without allocating its weights
        unet = UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
    config = HyperLoRAConfig(
        targets=targets_from_unet(unet), num_basis=128, id_rank=8, base_rank=0, resampler_dim=1024,
        resampler_depth=4, resampler_heads=12, resampler_dim_head=64, num_id_tokens=16, image_embed_dim=1024,
    )  # fmt: skip
    predictor = HyperLoRAPredictor(config, dtype=torch.float16)
    save_release_checkpoint(predictor, folder, dtype=torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=Path(tempfile.gettempdir()) / "hyperlora-full-size")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    args = parser.parse_args()
    release = Path(args.workdir) / "release"
    if not (release / "hyper_lora_modules.safetensors").is_file():
        synthesize(release)
    size = sum(p.stat().st_size for p in release.iterdir())
    out = Path(args.workdir) / f"converted-{args.dtype}"
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(release), str(out), args.dtype], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 1024**3
    print(
        f"release-shaped checkpoint: {size / gib:.2f} GiB; convert to {args.dtype} took {result['seconds']:.0f} s; "
        f"peak memory above the process baseline: {result['rss_above_baseline'] / gib:.2f} GiB resident "
        f"(VmHWM), {result['anon_above_baseline'] / gib:.2f} GiB anonymous (RssAnon)"
    )


if __name__ == "__main__":
    main()
