"""Write an expert store of random weights with a real model's shapes, no checkpoint needed.

    python -m bench synth-store --config qwen3-30b-a3b --out STORE [--layers N] [--dtype bfloat16]
                                [--expert-format dense|fp8] [--fp8-block N]
                                [--seed S] [--device cpu|cuda] [--workers N]

--config names a file of bench/configs (qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b),
`demo`, or a config.json path. The store is the extractor's format byte for byte (its
safetensors header encoder, its atomic hashed file writer, its manifest writer), so
`python -m extractor --out STORE --verify` checks it and the runtime serves it. Only the
weights are synthetic: bench.synth_weights draws them with a calibrated routing spread
(printed, and recorded under "synthetic" in the manifest). The tokenizer is the demo
model's (8,192 ids, which every config's vocabulary contains): prompts encode, generated ids
beyond it decode to nothing.

--expert-format fp8 models an FP8 checkpoint (Qwen3-30B-A3B-FP8): the routed experts, drawn as
for dense, are quantised on --device by the extractor's own quantiser (extractor.quant, 128x128
float32 block scales by default) and written, with the manifest's "expert_format", exactly as
`python -m extractor --dtype fp8` writes them; the trunk stays in --dtype. A miss then moves
about half a bf16 expert's bytes (the host tier keeps them quantised, the device dequantises).

Speed: each expert shard is generated on --device, copied to the host and written by one of
--workers threads (hashing and writing release the GIL), so generation, copies, hashing and
disk writes overlap; the printed GB/s is bytes written over wall time. FP8 quantisation runs
on the writer threads too; on a CPU it costs ~0.15 s an expert at Qwen3-30B-A3B's width, so a
full-depth FP8 store wants --device cuda.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.synth_weights import CALIBRATION, DEFAULT_SPREAD, Spread, expert_projections, expert_tensor, trunk_tensor
from extractor.formats import DENSE, FP8, FP8_DTYPE, expected_shapes, manifest_entry, tensor_names
from extractor.plan import FP8_BLOCK

CONFIG_DIR = Path(__file__).parent / "configs"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EXPERT_FORMATS = (DENSE, FP8)


class SynthError(ValueError):
    """Bad input: exit 2 with one line."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench synth-store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="qwen3-30b-a3b, deepseek-v2-lite, mixtral-8x7b, demo, or a path")
    p.add_argument("--out", required=True, type=Path, help="store directory: new or empty")
    p.add_argument("--layers", type=int, help="decoder layers (default: the config's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="the trunk's and the computation's dtype; dense experts' too (default bfloat16)")
    p.add_argument("--expert-format", choices=EXPERT_FORMATS, default=DENSE,
                   help="routed experts: dense (in --dtype) or fp8 (float8_e4m3fn + float32 block scales, "
                        "what `python -m extractor --dtype fp8` writes: half a bf16 expert's bytes)")
    p.add_argument("--fp8-block", metavar="N", type=int,
                   help=f"with --expert-format fp8: rows and columns per scale, dividing the experts' shapes "
                        f"(default {FP8_BLOCK[0]}, Qwen3-FP8's and DeepSeek-V3's block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where weights are drawn: cpu or cuda (default cpu)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="writer threads")
    p.add_argument("--embed-std", type=float, default=DEFAULT_SPREAD.embed_std, help="routing spread (see docs)")
    p.add_argument("--gate-std", type=float, default=DEFAULT_SPREAD.gate_std, help="routing spread (see docs)")
    p.add_argument("--skew", type=float, default=DEFAULT_SPREAD.skew, help="routing spread (see docs)")
    return p.parse_args(argv)


def load_config(name: str) -> dict:
    """A config.json dict: bench/configs/NAME.json, the demo model's, or a file path."""
    if name == "demo":
        from models.demo import CHECKPOINT_DIR

        path = CHECKPOINT_DIR / "config.json"
    else:
        path = CONFIG_DIR / f"{name}.json" if (CONFIG_DIR / f"{name}.json").is_file() else Path(name)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise SynthError(f"--config {name}: no such config (known: {known}, demo, or a config.json path)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise SynthError(f"{path}: not JSON ({exc})") from None


def cut_depth(config: dict, layers: int | None) -> dict:
    """The config with its decoder cut to `layers` (per-layer lists cut alike)."""
    if layers is None:
        return dict(config)
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise SynthError(f"--layers {layers}: must be in [1, {config['num_hidden_layers']}]")
    cut = {**config, "num_hidden_layers": layers}
    for key in ("layer_types", "mlp_layer_types"):
        if isinstance(cut.get(key), list):
            cut[key] = cut[key][:layers]
    if isinstance(cut.get("mlp_only_layers"), list):
        cut["mlp_only_layers"] = [layer for layer in cut["mlp_only_layers"] if layer < layers]
    return cut


class Layout:
    """What to write, read off transformers' model built on the meta device."""

    def __init__(self, config: dict, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        from models.footprint import hf_config

        self.config = config
        hf = hf_config(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf, dtype=dtype)
        text = hf.get_text_config()
        self.top_k = int(text.num_experts_per_tok)
        self.init_std = float(getattr(text, "initializer_range", 0.02) or 0.02)
        self.layers = int(text.num_hidden_layers)
        self.experts: dict[int, tuple[int, int, int]] = {}  # MoE layer -> (E, I, H)
        for name, module in model.named_modules():
            if name.endswith(".experts") and hasattr(module, "down_proj") and module.down_proj.dim() == 3:
                num, hidden, inter = module.down_proj.shape  # [E, H, I]
                self.experts[int(name.split(".")[-3])] = (int(num), int(inter), int(hidden))
        if not self.experts:
            raise SynthError(f"{config.get('model_type')}: no fused routed experts found: not a MoE config")
        self.num_experts = max(e for e, _, _ in self.experts.values())
        self.trunk = trunk_entries(model)  # [(checkpoint name, shape, model name)]


def trunk_entries(model) -> list[tuple[str, tuple[int, ...], str]]:
    """Every non-expert tensor a checkpoint of `model` holds, under its checkpoint name, in name order."""
    tensors = {name: t for name, t in model.state_dict().items() if ".experts." not in name}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()}
    tensors = {name: t for name, t in tensors.items() if name not in tied}  # tied copies are not saved
    try:  # transformers renames some keys on load (Mixtral: block_sparse_moe -> mlp); save them as checkpoints do
        from transformers.core_model_loading import revert_weight_conversion

        names = {id(t): name for name, t in tensors.items()}
        saved = {ckpt: names[id(t)] for ckpt, t in revert_weight_conversion(model, dict(tensors)).items()}
    except (ImportError, KeyError, TypeError):
        saved = {name: name for name in tensors}
    return sorted((ckpt, tuple(tensors[name].shape), name) for ckpt, name in saved.items())


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        config = cut_depth(load_config(args.config), args.layers)
        _check_out(args.out)
        if args.workers < 1:
            raise SynthError(f"--workers {args.workers}: must be at least 1")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SynthError(f"--device {args.device}: no CUDA device here")
        if args.fp8_block is not None and args.expert_format != FP8:
            raise SynthError(f"--fp8-block {args.fp8_block}: only with --expert-format fp8")
        if args.fp8_block is not None and args.fp8_block < 1:
            raise SynthError(f"--fp8-block {args.fp8_block}: must be at least 1")
        spread = Spread(embed_std=args.embed_std, gate_std=args.gate_std, skew=args.skew)
        layout = Layout({**config, "torch_dtype": args.dtype}, DTYPES[args.dtype])
        block = fp8_block(layout, args.fp8_block) if args.expert_format == FP8 else None
    except (SynthError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    writer = StoreWriter(args.out, layout, DTYPES[args.dtype], args.seed, spread, args.device, args.workers, block)
    summary = writer.write(name=args.config)
    print(summary)
    return 0


def fp8_block(layout: Layout, size: int | None) -> tuple[int, int]:
    """The FP8 scale block, [size, size] (default the extractor's), checked to divide every MoE layer's
    experts as the extractor checks it: a partial block would need a scale grid the runtime never sees."""
    block = FP8_BLOCK if size is None else (size, size)
    for layer, (_, inter, hidden) in sorted(layout.experts.items()):  # gate/up [I, H], down [H, I]: square blocks
        if inter % block[0] or hidden % block[1]:
            raise SynthError(f"--expert-format fp8: block {block[0]}x{block[1]} does not divide layer {layer}'s "
                             f"experts [{inter}, {hidden}]; pass --fp8-block N dividing both")
    return block


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthError(f"--out {out}: exists and is not an empty directory")


class StoreWriter:
    """Writes config, tokenizer, trunk and every expert shard, then the manifest (last, durable)."""

    def __init__(self, out: Path, layout: Layout, dtype: torch.dtype, seed: int, spread: Spread, device: str,
                 workers: int, block: tuple[int, int] | None = None):
        from extractor.safetensors_format import TORCH_NAMES, encode_header

        self.out, self.layout, self.dtype, self.seed, self.spread = out, layout, dtype, seed, spread
        self.block = block  # None: dense experts in `dtype`; else FP8 with [rows, cols] block scales
        self.format = DENSE if block is None else FP8
        self.device, self.workers = torch.device(device), workers
        self.st_dtype = TORCH_NAMES[str(dtype).removeprefix("torch.")]
        self.files: dict[str, object] = {}  # relative path -> extractor.writer.FileRecord
        self.written = 0
        self._lock = threading.Lock()
        self._encode_header = encode_header

    def write(self, name: str) -> str:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._small_files()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="synth") as pool:
            jobs = [pool.submit(self._expert, layer, expert) for layer, (count, _, _) in self.layout.experts.items()
                    for expert in range(count)]
            self._trunk()  # on this thread, while the pool writes experts
            for job in jobs:
                job.result()
        self._make_durable()
        self._manifest(name)
        seconds = time.perf_counter() - started
        dtype = str(self.dtype).removeprefix("torch.")
        experts = (f"{dtype} experts" if self.block is None else
                   f"fp8 experts ({self.block[0]}x{self.block[1]} block scales), {dtype} trunk")
        return (f"synth-store {name}: {len(self.layout.experts)} MoE layers x {self.layout.num_experts} experts + trunk, "
                f"{experts}, "
                f"{self.written / 1e9:.2f} GB in {seconds:.1f} s = {self.written / 1e9 / seconds:.2f} GB/s "
                f"({self.workers} writers, drawn on {self.device}) -> {self.out}; routing spread "
                f"embed_std={self.spread.embed_std} gate_std={self.spread.gate_std} skew={self.spread.skew} "
                f"({CALIBRATION if self.spread == DEFAULT_SPREAD else 'not the calibrated default'})")

    # --- files -------------------------------------------------------------------------------
    def _small_files(self) -> None:
        from models.demo import CHECKPOINT_DIR

        config = self.layout.config
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        self._write_bytes("config.json", json.dumps(config, indent=2).encode())
        self._write_bytes("generation_config.json", json.dumps(generation, indent=2).encode())
        for name in TOKENIZER_FILES:
            self._write_bytes(name, (CHECKPOINT_DIR / name).read_bytes())

    def _trunk(self) -> None:
        from extractor.store import TRUNK

        entries = self.layout.trunk
        header = self._encode_header([(ckpt, self.st_dtype, shape) for ckpt, shape, _ in entries])
        chunks = (self._host_bytes(trunk_tensor(model_name, shape, self.dtype, seed=self.seed, spread=self.spread,
                                                init_std=self.layout.init_std, num_experts=self.layout.num_experts,
                                                layers=self.layout.layers, device=self.device))
                  for _, shape, model_name in entries)
        self._write_file(TRUNK, [header], chunks)

    def _expert(self, layer: int, expert: int) -> None:
        from extractor.store import expert_relpath

        _, inter, hidden = self.layout.experts[layer]
        names = tensor_names(self.format, bias=False)  # the extractor's shard order: weights, then scales
        shapes = expected_shapes(self.format, inter, hidden, self.block)
        weight_dtype = self.st_dtype if self.block is None else FP8_DTYPE
        dtypes = {name: "F32" if name.endswith("_scale_inv") else weight_dtype for name in names}
        header = self._encode_header([(name, dtypes[name], shapes[name]) for name in names])
        weights = expert_tensor(layer, expert, inter, hidden, self.dtype, seed=self.seed,
                                init_std=self.layout.init_std, layers=self.layout.layers, device=self.device)  # [3IH]
        if self.block is None:
            data = [self._host_bytes(weights)]
        else:
            from extractor.quant import quantize_fp8

            tensors = {}
            for proj, weight in expert_projections(weights, inter, hidden).items():
                tensors[proj], tensors[proj + "_scale_inv"] = quantize_fp8(weight, self.block)
            data = [self._host_bytes(tensors[name]) for name in names]
        path = self.out / expert_relpath(layer, expert)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_file(expert_relpath(layer, expert), [header, *data], tensor_bytes=sum(len(d) for d in data))

    def _write_bytes(self, rel: str, data: bytes) -> None:
        self._write_file(rel, [data])

    def _write_file(self, rel: str, head: list, rest=(), tensor_bytes: int | None = None) -> None:
        from extractor.writer import AtomicFile

        out = AtomicFile(self.out / rel)
        try:
            for chunk in [*head, *rest]:
                out.write(chunk)
        except BaseException:
            out.abort()
            raise
        record = out.commit(lambda: None, tensor_bytes=tensor_bytes)
        with self._lock:
            self.files[rel] = record
            self.written += record.bytes

    @staticmethod
    def _host_bytes(tensor: torch.Tensor) -> memoryview:
        return memoryview(tensor.contiguous().cpu().view(torch.uint8).numpy()).cast("B")

    def _make_durable(self) -> None:
        from extractor.writer import fsync_dir, fsync_path

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(lambda rel: fsync_path(self.out / rel), self.files))
        for directory in {(self.out / rel).parent for rel in self.files}:
            fsync_dir(directory)

    def _manifest(self, name: str) -> None:
        from extractor.extract import write_manifest
        from extractor.store import FORMAT_VERSION

        config_sha = self.files["config.json"].sha256
        layout = self.layout
        experts = "" if self.block is None else f":fp8:{self.block[0]}x{self.block[1]}"  # dense: as before fp8
        request = f"{config_sha}:{self.seed}:{self.spread}:{self.dtype}{experts}"
        fingerprint = hashlib.sha256(request.encode()).hexdigest()[:16]
        manifest = {
            "format_version": FORMAT_VERSION,
            "family": layout.config["model_type"],
            "source": {"path": f"synthetic:{name}", "config_sha256": config_sha},
            "dtype": str(self.dtype).removeprefix("torch."),
            "num_layers": layout.config["num_hidden_layers"],
            "moe_layers": sorted(layout.experts),
            "num_experts": layout.num_experts,
            "top_k": layout.top_k,
            "experts": {str(layer): list(range(count)) for layer, (count, _, _) in sorted(layout.experts.items())},
            "files": {rel: record.to_json() for rel, record in sorted(self.files.items())},
            "plan": f"synth-{fingerprint}",
            "source_fused_experts": False,
        }
        expert_format = manifest_entry(self.format, False, None if self.block is None else list(self.block))
        if expert_format is not None:  # absent: dense experts, as the extractor writes them
            manifest["expert_format"] = expert_format
        manifest["synthetic"] = {"config": name, "seed": self.seed, "device": str(self.device), **self.spread.as_dict()}
        write_manifest(self.out, manifest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
