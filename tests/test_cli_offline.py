"""docs/cli.md's offline section runs as written: every command on the built-in tiny default, in an empty folder,
with no network (HF_HUB_OFFLINE=1), quietly (no third-party noise unless -v)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# onnxruntime's native library leaves a `.ses` file in the temporary folder; it is not ours to remove
THIRD_PARTY_TEMP = {".ses"}
NOISE = ("torchvision", "FutureWarning", "Traceback", "Writing model shards", "Loading weights")


def offline_block() -> str:
    """The `bash` block of docs/cli.md's section whose heading contains "offline"."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = re.search(r"^## [^\n]*offline[^\n]*\n(.*?)(?=^## )", text, flags=re.S | re.M | re.I)
    assert section, "docs/cli.md has no section whose heading contains 'offline'"
    block = re.search(r"```bash\n(.*?)```", section.group(1), flags=re.S)
    assert block, "the offline section of docs/cli.md has no ```bash block"
    return block.group(1)


def _environment(bin_dir: Path) -> dict:
    """The checkout's source first; `diffusers-hyperlora` is the installed entry point when there is one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get(
        "PYTHONPATH", "")])}  # fmt: skip
    installed = shutil.which("diffusers-hyperlora", path=os.path.dirname(sys.executable))
    bin_dir.mkdir()
    if installed is None:  # an uninstalled checkout: the same main() through `python -m`
        shim = bin_dir / "diffusers-hyperlora"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m diffusers_hyperlora.cli "$@"\n')
        shim.chmod(0o755)
    if shutil.which("python", path=os.path.dirname(sys.executable)) is None:
        shim = bin_dir / "python"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), str(bin_dir), env.get("PATH", "")])
    return env


def test_the_offline_section_runs_as_written(tmp_path):
    block = offline_block()
    commands = [line for line in block.splitlines() if line.startswith("diffusers-hyperlora ")]
    assert len(commands) >= 4
    work = tmp_path / "empty"
    work.mkdir()
    env = _environment(tmp_path / "bin")
    temp = tmp_path / "temp"  # the commands' temporary folder, to check they leave nothing in it
    temp.mkdir()
    env["TMPDIR"] = str(temp)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    noise = [word for word in NOISE if word in result.stderr]
    assert not noise, f"third-party noise without -v: {noise}\n{result.stderr[-3000:]}"

    from diffusers_hyperlora import HyperLoRAIdentity, load_predictor

    for name in ("me.safetensors", "me2.safetensors", "blend.safetensors"):
        assert HyperLoRAIdentity.load(work / name).num_images >= 1
    assert HyperLoRAIdentity.load(work / "me2.safetensors").num_images == 2  # the photo + the saved identity
    # the converted tiny checkpoint is the model `--model tiny` used: identities of one load against the other
    HyperLoRAIdentity.load(work / "me.safetensors", predictor=load_predictor(work / "tiny-checkpoint"))
    for name in ("me_lora.safetensors", "slider.safetensors", "data/features.safetensors"):
        assert (work / name).stat().st_size > 0
    assert (work / "run" / "id_clip" / "predictor" / "config.json").is_file()
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
    assert not leftovers, leftovers  # no temporary folders left behind
    left = sorted(p.name for p in temp.iterdir() if p.name not in THIRD_PARTY_TEMP)
    assert left == [], f"the commands left files in the temporary folder: {left}"


def test_third_party_noise_shows_with_verbose(tmp_path):
    """The offline block above runs quietly; `-v` shows what it hides (so that check cannot pass vacuously).

    Which warnings the dependencies print depends on their versions (torchvision's with the newest transformers,
    skimage's with insightface 0.7), so the check is: quiet without `-v`, some of the known noise with it."""
    from diffusers_hyperlora.testing.tiny_checkpoint import tiny_example_photo

    tiny_example_photo(tmp_path / "me.png")
    env = _environment(tmp_path / "bin")
    argv = ["diffusers-hyperlora", "identity", "me.png", "-o", "me.safetensors", "--model", "tiny", "--overwrite"]
    quiet = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    loud = subprocess.run([*argv, "-v"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-3000:] + loud.stderr[-3000:]
    assert not [word for word in NOISE if word in quiet.stderr], quiet.stderr[-3000:]
    assert [word for word in NOISE if word in loud.stderr], loud.stderr[-3000:]


def test_cache_features_hides_the_loading_weights_bar_unless_verbose(tmp_path):
    """transformers' "Loading weights" progress bar (the CLIP encoder's load) shows only with `-v`."""
    import transformers

    from diffusers_hyperlora.testing.tiny_checkpoint import tiny_example_photo

    (tmp_path / "data").mkdir()
    tiny_example_photo(tmp_path / "data" / "me.png")
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file": "me.png", "person": "me", "caption": "a photo"}\n')
    env = _environment(tmp_path / "bin")
    argv = ["diffusers-hyperlora", "cache-features", "data", "--model", "tiny", "--overwrite"]
    quiet = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "Loading weights" not in quiet.stderr and "face features" in quiet.stderr, quiet.stderr[-3000:]
    loud = subprocess.run([*argv, "-v"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert loud.returncode == 0, loud.stderr[-3000:]
    if int(transformers.__version__.split(".")[0]) >= 5:  # older versions draw no bar for a single-file model
        assert "Loading weights" in loud.stderr, loud.stderr[-3000:]
