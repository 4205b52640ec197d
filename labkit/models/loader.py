"""Find a checkpoint, build our model class for it, and fill it with weights.

Formats: an HF directory with safetensors (one file or sharded with the index), a GGUF file
(converted once, see gguf_convert), `load_format="dummy"` (random weights from config.json alone),
and pickled `*.bin` only when the user asks for it with `load_format="pt"`. FP8 checkpoints' float8
weights and their scales load as they are stored (labkit.layers.quantization says how).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from labkit.layers.quantization.fp8 import FP8, FP8_MAX
from labkit.models.gguf_convert import convert_gguf
from labkit.models.model_config import ModelConfig
from labkit.models.model_parts import ModelParts
from labkit.models.registry import model_class

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy", "pt")
DUMMY_RANGE = 0.02  # random weights are uniform in [-0.02, 0.02]


def resolve_model_dir(model: str) -> Path:
    """A checkpoint directory for `model`: a directory, a .gguf file, or a directory with one."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(
            f"model: path {model!r} does not exist (a local checkpoint is a directory with "
            "config.json, or a .gguf file; a Hugging Face repo id is written org/name)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {model!r} is a file but not a .gguf file")
        return convert_gguf(path)
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf(ggufs[0])
        raise ValueError(
            f"model: directory {model!r} has no config.json (nor exactly one .gguf file)"
        )
    return path


def _checkpoint_tensors(model_dir: Path, load_format: str):
    files = sorted(model_dir.glob("*.safetensors"))
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    yield name, fh.get_tensor(name)
        return
    bins = sorted(model_dir.glob("*.bin"))
    if bins and load_format != "pt":
        raise ValueError(
            f"model: {model_dir} has only pickled *.bin weights, which can run code "
            "when loaded; pass load_format='pt' if you trust them"
        )
    if not bins:
        raise ValueError(f"model: no *.safetensors weights in {model_dir}")
    for f in bins:
        yield from torch.load(f, map_location="cpu", weights_only=True).items()


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a "
            f"parameter of shape {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def _fp8_tensor(name: str, param: nn.Parameter, tensor: torch.Tensor) -> torch.Tensor:
    """An FP8 parameter takes only FP8 tensors: a float one means that the checkpoint left the
    layer unquantized (`modules_to_not_convert`, `ignore`), which labkit does not support for
    the projections it quantizes."""
    if tensor.dtype != param.dtype:
        raise ValueError(
            f"checkpoint tensor {name!r} is {tensor.dtype}, but its layer holds {param.dtype} "
            "weights, as the checkpoint's quantization_config says; labkit quantizes every "
            "attention and MLP projection of an FP8 checkpoint and cannot leave one in float"
        )
    return tensor


def load_weights(model: nn.Module, tensors) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    # A model whose checkpoint names need more than `packed_modules` (experts numbered per
    # expert) maps them itself: name -> (parameter name, shard) or None.
    remap = getattr(model, "remap_weight_name", None)
    for stored_name, tensor in tensors:
        name = stored_name
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        shard = None
        remapped = remap(name) if remap is not None else None
        if remapped is not None:
            name, shard = remapped
        else:
            for src, (dst, shard_id) in packed.items():
                if f".{src}." in name:
                    name, shard = name.replace(f".{src}.", f".{dst}."), shard_id
                    break
        # transformers' block-wise FP8 checkpoints call the scale `weight_scale_inv`; it is the
        # factor that dequantizes (weight = q * scale), as compressed-tensors' `weight_scale`.
        name = name.removesuffix("_inv") if name.endswith(".weight_scale_inv") else name
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        if param.dtype == FP8:
            loaded = _fp8_tensor(stored_name, param, tensor)
        else:
            loaded = tensor.to(param.dtype)
        loader = getattr(param, "weight_loader", _copy_whole)
        if shard is None:
            loader(param, loaded)
        else:
            loader(param, loaded, shard)


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of a realistic scale, so benchmarks do real arithmetic (never zeros).
    Drawn on the parameters' own device: a 7B model on the CPU would take minutes."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.fill_(1.0)
        elif name.endswith("weight_scale"):  # FP8 weights: q in [-448, 448] times 0.02 / 448
            p.data.fill_(DUMMY_RANGE / FP8_MAX)
        else:
            g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            if p.dtype == FP8:
                draw = torch.empty(p.shape, device=p.device).uniform_(
                    -FP8_MAX, FP8_MAX, generator=g
                )
                p.data.copy_(draw.to(FP8))
            else:
                p.data.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=g)


def build_model(
    model_dir: Path,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    parts: ModelParts,
    seed: int = 0,
) -> nn.Module:
    """The model for `cfg`, its layers built with `parts` (this engine's TP group, kernel
    switches and gemv workspace), weights loaded (or drawn), on `device`, ready to run."""
    cls = model_class(cfg.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device if load_format == "dummy" else "cpu"):
            model = cls(cfg, parts)
    finally:
        torch.set_default_dtype(prev)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, _checkpoint_tensors(model_dir, load_format))
    model = model.to(device).eval()
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
    return model
