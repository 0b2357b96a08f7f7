"""HyperLoRA speed and memory benchmarks on a full-size SDXL-shaped HyperLoRA (random weights, no downloads).

Run from the repository root:

    python benchmarks/run.py                 # CPU defaults: a few minutes on 2 cores, ~18 GB peak RAM
    python benchmarks/run.py --quick         # fewer repeats, skips the naive 16-bit path
    python benchmarks/run.py --dry-run       # every section at tiny sizes in seconds (scripts/gpu-check.sh on a CPU)
    python benchmarks/run.py --help

Every ratio is against a baseline measured in the same run, on the same device. The table is printed and
written to `docs/benchmarks.md` (with the device description). See `benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers_hyperlora  # noqa: E402,F401  (installs pipe.load_hyperlora)
from diffusers_hyperlora import HyperLoRAConfig, HyperLoRAIdentity, HyperLoRAPredictor  # noqa: E402
from diffusers_hyperlora.model.targets import SDXL_UNET_CONFIG, targets_from_unet  # noqa: E402
from diffusers_hyperlora.testing.tiny_models import TINY_UNET_CONFIG, tiny_hyperlora_config  # noqa: E402

DRY_RUN = False  # --dry-run: the tiny UNet and HyperLoRA of the tests instead of full-size SDXL shapes


def unet_config() -> dict:
    return TINY_UNET_CONFIG if DRY_RUN else SDXL_UNET_CONFIG


@dataclass
class Row:
    """One line of the results table."""

    section: str
    what: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""
    # Raw numbers for machine readers (docs/make_pictures.py draws the benchmark chart from benchmarks.json).
    data: dict[str, float | str] = field(default_factory=dict)


class _Rows(list):
    """The result rows; each row is printed as soon as it is measured."""

    def append(self, row: Row) -> None:
        super().append(row)
        print(
            "  | " + " | ".join(x for x in (row.what, row.value, row.baseline, row.ratio, row.verdict) if x), flush=True
        )


ROWS: list[Row] = _Rows()
NOTES: list[str] = []


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
        memory_text = f", {memory:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory_text = ""
    threads = torch.get_num_threads()
    return f"{model}, {os.cpu_count()} cores, {threads} torch threads{memory_text}, torch {torch.__version__}"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------------- building
def build_unet(device: torch.device, dtype: torch.dtype):
    """The SDXL UNet with random weights (fan-in scaled normal), built without the slow default init."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config())
    unet = unet.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    if any(True for _ in unet.buffers()):
        raise RuntimeError("The SDXL UNet config gained buffers; initialize them here before benchmarking.")
    return unet


def sdxl_pipeline(unet):
    """A `StableDiffusionXLPipeline` around the full-size UNet (tiny text encoders / VAE: never run here)."""
    from diffusers import StableDiffusionXLPipeline

    from diffusers_hyperlora.testing.tiny_models import tiny_sdxl_components

    components = tiny_sdxl_components()
    components["unet"] = unet
    return StableDiffusionXLPipeline(**components)


def sdxl_hyperlora_config(unet) -> HyperLoRAConfig:
    """The release architecture: K = 128, rank 8, resampler 1024 x 4 layers, 560 linears of this UNet."""
    return tiny_hyperlora_config(unet) if DRY_RUN else HyperLoRAConfig(targets=targets_from_unet(unet))


def build_predictor(config: HyperLoRAConfig, device: torch.device, dtype: torch.dtype) -> HyperLoRAPredictor:
    """Random full-size predictor; banks filled chunk by chunk so a 16-bit bank never exists in float32."""
    torch.manual_seed(0)
    with torch.device("meta"):
        predictor = HyperLoRAPredictor(config)
    predictor = predictor.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in predictor.named_parameters():
            if ".down." in name:
                std = param.shape[2] ** -0.5
            elif ".up." in name:
                std = 0.02
            else:
                std = 0.02 if param.ndim >= 2 else 0.0
            flat = param.view(-1)
            for start in range(0, flat.numel(), 1 << 26):
                part = flat[start : start + (1 << 26)]
                if std:
                    part.copy_(torch.randn(part.shape, generator=generator, device=device).mul_(std))
                else:
                    part.fill_(1.0 if name.endswith("weight") else 0.0)
    return predictor.eval().requires_grad_(False)


def random_identity(predictor: HyperLoRAPredictor, seed: int) -> HyperLoRAIdentity:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(predictor.config.num_tokens, predictor.config.num_basis, generator=generator)
    return HyperLoRAIdentity(mean, 1, None, predictor.checkpoint_hash, predictor.probe)


def bank_bytes(predictor: HyperLoRAPredictor) -> int:
    return sum(p.numel() * p.element_size() for p in predictor.id_bank.parameters())


# ---------------------------------------------------------------------------------------------------- sections
def measure_read_bandwidth(device: torch.device, gib: float, repeats: int) -> float:
    """Bytes/s of a float32 reduction over a buffer far larger than the caches (best of `repeats`)."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    best = min(timed(buffer.sum, repeats, device))
    return buffer.numel() * 4 / best


def bank_reader(predictor: HyperLoRAPredictor) -> Callable[[], object]:
    """A float32 reduction over every byte of the ID bank (16-bit banks are reinterpreted, not converted)."""
    flat = [p.detach().reshape(-1).view(torch.float32) for p in predictor.id_bank.parameters()]

    def read() -> list[torch.Tensor]:
        return [tensor.sum() for tensor in flat]

    return read


def scan_section(predictor: HyperLoRAPredictor, device: torch.device, label: str, args) -> None:
    """The NaN/inf scan `load_hyperlora` runs once over every weight, against one read of the bank's bytes."""
    read_bank = bank_reader(predictor)
    scan_times, read_times = [], []
    for repeat in range(args.repeats):
        scan_times += timed(predictor.check_weights_finite, 1, device, warmup=int(repeat == 0))
        read_times += timed(read_bank, 1, device, warmup=int(repeat == 0))
    scan, bound = min(scan_times), min(read_times)
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label}: load-time NaN/inf scan of every predictor weight (once per load_hyperlora)",
            ms(scan),
            f"one read of the ID bank's bytes {ms(bound)} (best of {args.repeats}, interleaved)",
            f"{scan / bound:.2f}x",
            data={"kind": "scan", "dtype": label, "scan_ms": 1e3 * scan, "bound_ms": 1e3 * bound},
        )
    )


def kohya_state_dict(predictor: HyperLoRAPredictor, identity: HyperLoRAIdentity, device) -> dict[str, torch.Tensor]:
    """The identity's LoRA as a kohya dict, one einsum per linear: what a user computes without the bank mix."""
    coefficients = predictor.split_coefficients(identity.id_coefficients.to(device))
    bank = predictor.id_bank
    alpha = predictor.config.alpha("id")
    state_dict = {}
    with torch.no_grad():
        for index, linear in enumerate(predictor.config.linears):
            g, p = bank.locations[index]
            down_basis, up_basis = bank.down[g][p], bank.up[g][p]
            down = torch.einsum("k,kir->ri", coefficients[index, 0].to(down_basis.dtype), down_basis)
            up = torch.einsum("k,kro->or", coefficients[index, 1].to(up_basis.dtype), up_basis)
            state_dict[f"{linear.kohya_name}.lora_down.weight"] = down
            state_dict[f"{linear.kohya_name}.lora_up.weight"] = up
            state_dict[f"{linear.kohya_name}.alpha"] = torch.tensor(float(alpha))
    synchronize(device)
    return state_dict


def naive_switch(pipe, predictor: HyperLoRAPredictor, identity: HyperLoRAIdentity, device) -> dict[str, float]:
    """What a user does today: per-layer einsum into a kohya dict, `load_lora_weights`, later `delete_adapters`."""
    start = time.perf_counter()
    state_dict = kohya_state_dict(predictor, identity, device)
    mixed = time.perf_counter()
    pipe.load_lora_weights(state_dict, adapter_name="naive")
    synchronize(device)
    loaded = time.perf_counter()
    pipe.delete_adapters("naive")
    synchronize(device)
    deleted = time.perf_counter()
    return {"einsum": mixed - start, "load": loaded - mixed, "delete": deleted - loaded, "total": deleted - start}


def hotswap_section(pipe, predictor, identities, device, label: str, switch_time: float, args) -> None:
    """diffusers' own fast swap, a peer of our switch on the same identities: `enable_lora_hotswap(target_rank=r)`
    before the first LoRA, then `load_lora_weights(lora, adapter_name=..., hotswap=True)` copies each new LoRA into
    the loaded adapter in place. Each swap still needs the LoRA itself: the same per-layer einsum as the naive path.
    Runs with HyperLoRA unloaded (diffusers requires hotswap to be enabled before any adapter is loaded)."""
    rank = predictor.config.id_rank
    pipe.enable_lora_hotswap(target_rank=rank)
    pipe.load_lora_weights(kohya_state_dict(predictor, identities[1], device), adapter_name="hotswap")
    runs = []
    for repeat in range(args.repeats + 1):  # the first one is a warm-up
        start = time.perf_counter()
        state_dict = kohya_state_dict(predictor, identities[repeat % 2], device)
        mixed = time.perf_counter()
        pipe.load_lora_weights(state_dict, adapter_name="hotswap", hotswap=True)
        synchronize(device)
        runs.append({"einsum": mixed - start, "load": time.perf_counter() - mixed})
    pipe.delete_adapters("hotswap")
    runs = runs[1:]
    einsum, load = min(r["einsum"] for r in runs), min(r["load"] for r in runs)
    total = min(r["einsum"] + r["load"] for r in runs)
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label}: diffusers hotswap (einsum into a LoRA dict {ms(einsum)}, "
            f"load_lora_weights(hotswap=True) {ms(load)}; enable_lora_hotswap(target_rank={rank}))",
            ms(total),
            f"ours {ms(switch_time)}",
            f"{total / switch_time:.1f}x faster",
            data={
                "kind": "hotswap", "dtype": label, "hotswap_ms": 1e3 * total, "einsum_ms": 1e3 * einsum,
                "load_ms": 1e3 * load, "switch_ms": 1e3 * switch_time,
            },  # fmt: skip
        )
    )


def switch_section(
    pipe, predictor, device, label: str, bandwidth: float, args, naive: bool, fused: bool = True
) -> None:
    """Prepared identity -> weights live in the UNet, against the bandwidth bound and the naive path."""
    pipe.load_hyperlora(predictor)
    cache = pipe.hyperlora.cache
    cache_budget, cache.max_bytes = cache.max_bytes, 0  # uncached: every switch mixes the bank
    identities = [random_identity(predictor, seed) for seed in range(2)]
    counter = iter(range(10**6))

    def switch() -> None:
        pipe.set_hyperlora_identity(identities[next(counter) % 2])

    # The bound: reading exactly the bank's bytes, from the same memory, interleaved with the switches so both
    # see the same machine conditions (this shared host's bandwidth drifts by up to 2x over minutes).
    read_bank = bank_reader(predictor)
    switch_times, read_times = [], []
    for repeat in range(args.repeats):
        switch_times += timed(switch, 1, device, warmup=int(repeat == 0))
        read_times += timed(read_bank, 1, device, warmup=int(repeat == 0))
    switch_time = min(switch_times)
    bound = min(read_times)
    ratio = switch_time / bound
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label} bank ({bank_bytes(predictor) / 2**30:.2f} GiB): prepared identity -> live weights",
            ms(switch_time),
            f"bandwidth bound {ms(bound)}: one read of the bank's bytes, "
            f"{bank_bytes(predictor) / bound / 1e9:.1f} GB/s (best of {args.repeats}, interleaved); "
            f"large-buffer bandwidth gives {ms(bank_bytes(predictor) / bandwidth)}",
            f"{ratio:.2f}x",
            "<= 1.3x bound",
            verdict(ratio <= 1.3),
            {"kind": "switch", "dtype": label, "switch_ms": 1e3 * switch_time, "bound_ms": 1e3 * bound},
        )
    )
    bound_row = f"bandwidth bound {ms(bound)}"
    cached_section(pipe, switch, read_bank, device, label, bound_row, bound, switch_time, cache_budget, args)
    if DRY_RUN and device.type == "cpu":  # compiling takes longer than the rest of a dry run; tests cover it
        ROWS.append(Row("1 identity switch", f"{label}: compiled kernel", "not measured (dry run on a CPU)"))
    elif predictor.dtype != torch.float32:
        compiled_switch_section(pipe, predictor, switch, read_bank, device, label, bound_row, args)
    else:
        compiled_reduction_tried(predictor, read_bank, device, label, bound_row, args)
    # Where the time goes: the mix alone, and the write alone.
    bank = predictor.id_bank
    coefficients = predictor.split_coefficients(identities[0].id_coefficients.to(device))
    mix_time = min(timed(lambda: bank.mix(coefficients), args.repeats, device))
    mixed = bank.mix(coefficients)
    adapters = pipe.hyperlora.adapters
    write_time = min(timed(lambda: adapters.write_mixed("id", bank.groups, mixed), args.repeats, device))
    ROWS.append(
        Row("1 identity switch", f"{label}: of which bank mix / adapter write", f"{ms(mix_time)} / {ms(write_time)}")
    )

    if fused:  # switching while fused (restore base weights, write, merge again); keeps a base-weight copy
        pipe.fuse_lora(adapter_names=[adapters.names["id"]])
        fused_time = min(timed(switch, max(1, args.repeats - 2), device))
        pipe.unfuse_lora()
        ROWS.append(Row("1 identity switch", f"{label}: switch while fused (restore, write, re-merge)", ms(fused_time)))

    if naive:
        log(f"naive path ({label})")
        runs = [naive_switch(pipe, predictor, identities[i % 2], device) for i in range(args.naive_repeats)]
        naive_total = min(r["total"] for r in runs)
        parts = {k: min(r[k] for r in runs) for k in ("einsum", "load", "delete")}
        speedup = naive_total / switch_time
        target = 300 if device.type == "cuda" else 5
        ROWS.append(
            Row(
                "1 identity switch",
                f"{label}: naive path (einsum {ms(parts['einsum'])}, load_lora_weights {ms(parts['load'])}, "
                f"delete_adapters {ms(parts['delete'])})",
                ms(naive_total),
                f"ours {ms(switch_time)}",
                f"{speedup:.1f}x faster",
                f">= {target}x faster",
                verdict(speedup >= target),
                {"kind": "naive", "dtype": label, "naive_ms": 1e3 * naive_total, "switch_ms": 1e3 * switch_time},
            )
        )
    else:
        ROWS.append(Row("1 identity switch", f"{label}: naive path", "not measured (--quick / --no-naive)"))
    pipe.unload_hyperlora()
    if args.hotswap:
        log(f"diffusers hotswap ({label})")
        hotswap_section(pipe, predictor, identities, device, label, switch_time, args)


def interleaved(fn: Callable[[], object], read_bank: Callable[[], object], device, repeats: int) -> tuple[float, float]:
    """Best times of `fn` and of the bank read, measured alternately (same machine conditions for both)."""
    times, reads = [], []
    for repeat in range(repeats):
        times += timed(fn, 1, device, warmup=int(repeat == 0))
        reads += timed(read_bank, 1, device, warmup=int(repeat == 0))
    return min(times), min(reads)


def cached_section(pipe, switch, read_bank, device, label, bound_row, bound, uncached, budget, args) -> None:
    """Switching back to identities in the prepared-identity cache: only the write into the adapters is left."""
    cache = pipe.hyperlora.cache
    cache.max_bytes = budget
    switch()
    switch()  # both identities are prepared now
    hits = cache.hits
    cached, bound = interleaved(switch, read_bank, device, args.repeats)
    if cache.hits - hits < args.repeats:
        raise RuntimeError("cached switches missed the prepared-identity cache")
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label}: cached switch (identity in the prepared-identity cache: write only)",
            ms(cached),
            f"{bound_row}; uncached switch {ms(uncached)}",
            f"{cached / bound:.2f}x bound, {uncached / cached:.1f}x faster than uncached",
            "",
            "",
            {"kind": "cached", "dtype": label, "cached_ms": 1e3 * cached, "uncached_ms": 1e3 * uncached},
        )
    )
    cache.clear()
    cache.max_bytes = 0


def compiled_switch_section(pipe, predictor, switch, read_bank, device, label, bound_row, args) -> None:
    """The 16-bit bank mixed by the compiled fused kernel (`BasisBank.compile_mix`) instead of chunked upcasts."""
    for bank in (predictor.id_bank, predictor.base_bank):
        if bank is not None:
            bank.compile_mix()
    start = time.perf_counter()
    switch()  # compiles the kernel (once per process)
    synchronize(device)
    first = time.perf_counter() - start
    compiled, bound = interleaved(switch, read_bank, device, args.repeats)
    ratio = compiled / bound
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label}: switch with the compiled fused kernel (`compile_mix()`; first switch incl. compilation "
            f"{first:,.1f} s)",
            ms(compiled),
            f"bandwidth bound {ms(bound)} (interleaved)",
            f"{ratio:.2f}x",
            "<= 1.3x bound",
            verdict(ratio <= 1.3),
            {"kind": "compiled", "dtype": label, "switch_ms": 1e3 * compiled, "bound_ms": 1e3 * bound},
        )
    )
    for bank in (predictor.id_bank, predictor.base_bank):
        if bank is not None:
            bank.compile_mix(False)


def compiled_reduction_tried(predictor, read_bank, device, label, bound_row, args) -> None:
    """What the compiled fused reduction gives on a float32 bank (tried; the batched product stays)."""
    from diffusers_hyperlora.model.bank import compiled_mix

    bank = predictor.id_bank
    identity = random_identity(predictor, 0)
    coefficients = predictor.split_coefficients(identity.id_coefficients.to(device))
    ordered = [coefficients[list(group.members)] for group in bank.groups]

    def kernel_mix() -> None:
        for g, picked in enumerate(ordered):
            compiled_mix(picked[:, 0], bank.down[g])
            compiled_mix(picked[:, 1], bank.up[g])

    def batched_mix() -> None:
        bank.mix(predictor.split_coefficients(identity.id_coefficients.to(device)))

    kernel_mix()  # compile
    kernel_time, bound = interleaved(kernel_mix, read_bank, device, max(2, args.repeats - 2))
    batched_time, bound2 = interleaved(batched_mix, read_bank, device, max(2, args.repeats - 2))
    ROWS.append(
        Row(
            "1 identity switch",
            f"{label}: bank mix only, compiled fused reduction (tried) / batched matrix product (used)",
            f"{ms(kernel_time)} / {ms(batched_time)}",
            f"bandwidth bound {ms(min(bound, bound2))} (interleaved)",
            f"{kernel_time / bound:.2f}x / {batched_time / bound2:.2f}x",
        )
    )


def unet_inputs(unet, latent: int, device: torch.device, dtype: torch.dtype, batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(0)
    side = 8.0 * latent
    config = unet.config
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim  # 1280 for SDXL
    return dict(
        sample=torch.randn(batch, 4, latent, latent, generator=generator).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_hidden_states=torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * batch).to(device, dtype),
        },
    )


def serving_section(pipe, predictor, device, args) -> None:
    """A batch of 4 different identities (per-sample LoRAs) against 4 batch-1 steps and a batch-4 one-identity step.

    Modes run interleaved, in an order rotated every round. Switching between modes uses the prepared-identity
    cache, so the bank is mixed once per identity.
    """
    unet = pipe.unet
    pipe.load_hyperlora(predictor)
    people = [random_identity(predictor, seed) for seed in range(4)]
    batch4 = unet_inputs(unet, args.latent, device, unet.dtype, 4)
    batch1 = unet_inputs(unet, args.latent, device, unet.dtype)
    with torch.no_grad():

        def per_sample() -> None:
            pipe.set_hyperlora_identities(people)
            times["4 identities, batch 4 (per-sample)"] += unet_step_times(unet, batch4, args.steps, device)

        def one_identity() -> None:
            pipe.set_hyperlora_identity(people[0])
            times["1 identity, batch 4"] += unet_step_times(unet, batch4, args.steps, device)

        def separate() -> None:
            for _ in range(args.steps):
                start = time.perf_counter()
                for person in people:  # cached switch + one batch-1 step per person
                    pipe.set_hyperlora_identity(person)
                    unet(**batch1)
                synchronize(device)
                times["4 identities, 4 batch-1 steps"].append(time.perf_counter() - start)

        times: dict[str, list[float]] = {
            "4 identities, batch 4 (per-sample)": [],
            "1 identity, batch 4": [],
            "4 identities, 4 batch-1 steps": [],
        }
        modes = [per_sample, one_identity, separate]
        per_sample()  # warm-up: prepares every identity, first steps
        times["4 identities, batch 4 (per-sample)"].clear()
        for round_index in range(args.rounds):
            for mode in modes[round_index % 3 :] + modes[: round_index % 3]:
                mode()
    pipe.set_hyperlora_identity(people[0])
    pipe.unload_hyperlora()
    base = min(times["1 identity, batch 4"])
    size = f"latent {args.latent}x{args.latent}, {unet.dtype}".replace("torch.", "")
    for name, values in times.items():
        step = min(values)
        ROWS.append(
            Row(
                "5 many identities",
                f"UNet step, {name}, {size}",
                ms(step),
                f"1 identity, batch 4: {ms(base)}" if name != "1 identity, batch 4" else f"best of {len(values)}",
                f"{step / base:.2f}x" if name != "1 identity, batch 4" else "",
                "",
                "",
                {"kind": "serving", "mode": name, "step_ms": 1e3 * step, "baseline_ms": 1e3 * base},
            )
        )


def unet_step_times(unet, inputs: dict, steps: int, device: torch.device) -> list[float]:
    with torch.no_grad():
        return timed(lambda: unet(**inputs), steps, device)


def generation_section(pipe, predictor, device, args) -> None:
    """Per-step UNet time with the identity active (unfused, fused) against the plain UNet, interleaved.

    Each round measures the plain UNet (HyperLoRA unloaded: no PEFT layers at all), unfused (loaded, identity
    written) and fused, in an order rotated every round, so a shared machine's drift hits all three alike.
    The bank is mixed once and then freed (generation does not read it).
    """
    unet = pipe.unet
    inputs = unet_inputs(unet, args.latent, device, unet.dtype)
    bank = predictor.id_bank
    identity = random_identity(predictor, 0)
    mixed = bank.mix(predictor.split_coefficients(identity.id_coefficients.to(device)))
    for param in bank.parameters():  # free the float32 bank for the fused mode's base-weight copy
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    times: dict[str, list[float]] = {"plain": [], "unfused": [], "fused": []}
    order = list(times)
    for round_index in range(args.rounds):
        for mode in order[round_index % 3 :] + order[: round_index % 3]:  # rotate the order every round
            if mode != "plain":
                pipe.load_hyperlora(predictor)
                pipe.hyperlora.adapters.write_mixed("id", bank.groups, mixed)
                if mode == "fused":
                    pipe.fuse_lora()
            times[mode] += unet_step_times(unet, inputs, args.steps, device)
            if mode == "fused":
                pipe.unfuse_lora()
            if mode != "plain":
                pipe.unload_hyperlora()
    plain, unfused, fused = times["plain"], times["unfused"], times["fused"]
    base = min(plain)
    size = f"latent {args.latent}x{args.latent} ({8 * args.latent} px), batch 1, {unet.dtype}".replace("torch.", "")
    ROWS.append(Row("2 generation", f"plain UNet step, {size}", ms(base), f"best of {len(plain)} steps"))
    for name, times, limit in (("unfused (PEFT adapters active)", unfused, 10.0), ("fused", fused, 2.0)):
        step = min(times)
        overhead = (step / base - 1.0) * 100.0
        ROWS.append(
            Row(
                "2 generation",
                f"UNet step with identity, {name}",
                ms(step),
                f"plain {ms(base)}",
                f"{overhead:+.1f} %",
                f"<= {limit:.0f} %",
                verdict(overhead <= limit),
            )
        )


def offload_section(config, device, args) -> None:
    """Low-VRAM mode: the fp16 bank in pinned CPU memory, streamed to the GPU for each mix; GPU memory during it."""
    if device.type != "cuda" and not DRY_RUN:
        ROWS.append(
            Row(
                "1 identity switch",
                "low-VRAM: bank in CPU memory, streamed (offload_bank=True)",
                "not measured (no GPU in this run)",
            )
        )
        return
    from diffusers_hyperlora.model.bank import mix_bases  # noqa: F401  (the streamed path)

    cuda = device.type == "cuda"
    predictor = build_predictor(config, torch.device("cpu"), torch.float16)
    predictor.resampler.to(device)
    if predictor.id_projector is not None:
        predictor.id_projector.to(device)
    if cuda:
        for param in predictor.id_bank.parameters():
            param.data = param.data.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    identity = random_identity(predictor, 0)
    coefficients = predictor.split_coefficients(identity.id_coefficients.to(device))
    bank = predictor.id_bank
    times = timed(functools.partial(bank.mix, coefficients), args.repeats, device)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    ROWS.append(
        Row(
            "1 identity switch",
            f"low-VRAM: fp16 bank ({bank_bytes(predictor) / 2**20:,.0f} MiB) in pinned CPU memory, streamed mix",
            ms(min(times)),
            f"GPU memory during the mix: {peak / 2**20:,.0f} MiB" if cuda else "GPU memory: not measured (no GPU)",
            data={"kind": "offload", "mix_ms": 1e3 * min(times), "peak_mib": peak / 2**20 if cuda else -1.0},
        )
    )
    del predictor, bank
    gc.collect()


# ---------------------------------------------------------------------------------------------------- photo -> weights
def photo_section(pipe_factory, predictor_factory, device, args) -> None:
    """Photo -> weights ready, broken down. Needs the face pipeline (src/diffusers_hyperlora/face)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from photo_bench import measure_photo_to_weights  # benchmarks/photo_bench.py

        import diffusers_hyperlora.face  # noqa: F401
    except ImportError as error:
        ROWS.append(Row("3 photo -> weights", "end to end", f"not measured: face pipeline missing ({error})"))
        return
    try:
        for row in measure_photo_to_weights(pipe_factory, device, args, predictor_factory):
            ROWS.append(row)
    except Exception as error:  # noqa: BLE001  (report, don't hide: the row says why)
        ROWS.append(Row("3 photo -> weights", "end to end", f"not measured: {type(error).__name__}: {error}"))


# ---------------------------------------------------------------------------------------------------- memory
def rss_peak_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process, from /proc (Linux) or getrusage."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak


def memory_child(dtype_name: str) -> None:
    """Run in a fresh process: build the full predictor, predict + mix, report RSS above the import baseline."""
    dtype = getattr(torch, dtype_name)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config())
    config = sdxl_hyperlora_config(unet)
    baseline, _ = rss_peak_bytes()
    predictor = build_predictor(config, torch.device("cpu"), dtype)
    resident, _ = rss_peak_bytes()
    features = torch.randn(1, 512), torch.randn(1, 257, config.image_embed_dim)
    identity = predictor.predict(id_embeds=features[0], clip_hidden_states=features[1])
    predictor.lora_weights(identity)
    _, peak = rss_peak_bytes()
    print(json.dumps({"baseline": baseline, "resident": resident - baseline, "peak": peak - baseline}))


def memory_section(device: torch.device, args) -> None:
    if device.type == "cuda":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config())
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        config = sdxl_hyperlora_config(unet)
        predictor = build_predictor(config, device, torch.float16)
        features = torch.randn(1, 512, device=device), torch.randn(1, 257, config.image_embed_dim, device=device)
        identity = predictor.predict(id_embeds=features[0], clip_hidden_states=features[1])
        predictor.lora_weights(identity)
        peak = torch.cuda.max_memory_allocated(device) - before
        ROWS.append(
            Row("4 memory", "predictor fp16, max_memory_allocated (build + predict + mix)", f"{peak / 2**30:.2f} GiB")
        )
        del predictor
        torch.cuda.empty_cache()
        return
    for dtype_name in args.memory_dtypes:
        child = [sys.executable, __file__, "--memory-child", dtype_name] + ["--dry-run"] * DRY_RUN
        result = subprocess.run(child, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            ROWS.append(Row("4 memory", f"predictor {dtype_name}", f"not measured: {result.stderr.strip()[-200:]}"))
            continue
        data = json.loads(result.stdout.strip().splitlines()[-1])
        ROWS.append(
            Row(
                "4 memory",
                f"predictor {dtype_name} (fresh process): RSS resident / peak during predict + mix",
                f"{data['resident'] / 2**30:.2f} GiB / {data['peak'] / 2**30:.2f} GiB",
                "above the process's RSS after imports",
            )
        )


# ---------------------------------------------------------------------------------------------------- report
def table() -> str:
    lines = [
        "| section | measurement | value | baseline (same run) | ratio | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        cells = (row.section, row.what, row.value, row.baseline, row.ratio, row.target, row.verdict)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path: Path, device_text: str, args, started: float, load_before: str) -> None:
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    text = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/run.py`; do not edit by hand. Explanations: [performance.md](performance.md).",
        "",
        f"- Device: {device_text}",
        f"- Command: `{command.strip()}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}, total {time.time() - started:.0f} s",
        f"- Load average (1/5/15 min) at start / end: {load_before} / {load_average()}",
        "- Every time is the best of its repeats (a shared machine only ever adds time); every ratio is against a "
        "baseline measured in this run.",
        "- Model: the tests' tiny UNet and HyperLoRA (`--dry-run`): every section runs; the times measure per-call "
        "overhead, not a full-size bank."
        if DRY_RUN
        else "- Model: full-size SDXL-shaped HyperLoRA (K = 128, rank 8, 560 target linears of the SDXL UNet config, "
        "resampler 1024 x 4), random weights; SDXL UNet with random weights.",
        "",
        table(),
        "",
    ]
    if NOTES:
        text += ["Notes:", ""] + [f"- {note}" for note in NOTES] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    # The same rows, machine-readable, beside the table (read by docs/make_pictures.py for the chart).
    rows = [asdict(row) for row in ROWS]
    report = {"device": device_text, "command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed identity switches per configuration")
    parser.add_argument("--naive-repeats", type=int, default=2, help="timed naive switches")
    parser.add_argument("--latent", type=int, default=None, help="latent side (CPU default 32, GPU default 128)")
    parser.add_argument("--steps", type=int, default=2, help="UNet steps per round and configuration")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of plain / unfused / fused steps")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="buffer size for the read bandwidth")
    parser.add_argument("--sections", default="switch,serving,generation,photo,memory")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive load_lora_weights path")
    parser.add_argument("--no-naive-16bit", action="store_true", help="skip the naive path for the 16-bit bank")
    parser.add_argument("--memory-dtypes", default="float16", help="comma list of predictor dtypes for the RSS rows")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no naive 16-bit path")
    parser.add_argument("--no-hotswap", dest="hotswap", action="store_false", help="skip diffusers' hotswap rows")
    parser.add_argument(
        "--dry-run", action="store_true", help="every section on the tests' tiny UNet and HyperLoRA, in seconds"
    )
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.rounds, args.no_naive_16bit = 3, 1, 1, True
    if args.dry_run:
        args.repeats, args.naive_repeats, args.steps, args.rounds, args.bandwidth_gib = 2, 1, 1, 1, 0.01
        args.latent = args.latent or 8
    args.memory_dtypes = [d for d in args.memory_dtypes.split(",") if d]
    args.sections = set(args.sections.split(","))
    return args


def main() -> None:
    global DRY_RUN
    args = parse_args()
    DRY_RUN = args.dry_run
    if args.memory_child:
        memory_child(args.memory_child)
        return
    started, load_before = time.time(), load_average()
    device = torch.device(args.device)
    if args.latent is None:
        args.latent = 128 if device.type == "cuda" else 32
    sixteen = torch.float16
    device_text = device_description(device)
    log(f"device: {device_text}")

    bandwidth = measure_read_bandwidth(device, args.bandwidth_gib, 5)
    ROWS.append(
        Row("0 device", "read bandwidth (float32 sum over a large buffer, best of 5)", f"{bandwidth / 1e9:.1f} GB/s")
    )
    log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")

    if args.sections & {"switch", "serving", "generation", "photo"}:
        log("building the SDXL UNet (random weights)")
        unet = build_unet(device, torch.float32)
        pipe = sdxl_pipeline(unet)
        config = sdxl_hyperlora_config(unet)
        log("building the float32 predictor")
        predictor = build_predictor(config, device, torch.float32)
        report = functools.partial(write_report, Path(args.output), device_text, args, started, load_before)
        if "switch" in args.sections:
            log("float32 identity switches")
            # No fused-switch row in float32: the base-weight copy (3.6 GB) would not fit beside bank and UNet.
            switch_section(pipe, predictor, device, "float32", bandwidth, args, naive=not args.no_naive, fused=False)
            scan_section(predictor, device, "float32", args)
            report()
        if "serving" in args.sections:
            log("many identities: per-sample batch vs separate steps vs one identity")
            serving_section(pipe, predictor, device, args)
            report()
        if "generation" in args.sections:
            log("UNet steps with the identity, unfused / fused")
            generation_section(pipe, predictor, device, args)
            report()
        del predictor
        gc.collect()
        if "switch" in args.sections:
            log("16-bit identity switches (UNet and bank in float16)")
            unet.to(sixteen)
            predictor = build_predictor(config, device, sixteen)
            switch_section(
                pipe, predictor, device, "float16", bandwidth, args, naive=not (args.no_naive or args.no_naive_16bit)
            )
            del predictor
            gc.collect()
            offload_section(config, device, args)
            report()
        if "photo" in args.sections:
            log("photo -> weights")
            photo_section(lambda: pipe, lambda: build_predictor(config, device, sixteen), device, args)
            report()
        del pipe, unet
        gc.collect()
    if "memory" in args.sections:
        log("predictor memory")
        memory_section(device, args)

    print()
    print(table())
    write_report(Path(args.output), device_text, args, started, load_before)
    log(f"written to {args.output}")


if __name__ == "__main__":
    main()
