"""Is this an SD1.5 model (or VAE)? Decided from file headers and key names, before any job runs.

The Snakefile calls `model_specs(config)` while it builds the DAG: it answers which model family
(tifactory.families) each model is, as the `ModelSpec` the jobs get, and a wrong `base_model`, `vae`,
`base_model_config` or `eval_models` entry is one clear message naming its config key instead of a
failed job. What is read, without torch:

* `.safetensors`: the JSON header (tensor names, shapes, dtypes, metadata); no tensor data.
* `.ckpt`/`.pt`/`.pth` in torch's zip format: only the archive's `data.pkl`, unpickled by a restricted
  unpickler that imports nothing and calls nothing (every global becomes an inert stand-in; tensors
  become their shapes). Legacy (pre-zip) pickles are read the same way up to their tensor data. A pickle
  that names code beyond tensors and containers is reported: the loader would refuse it.
* diffusers folders: their `model_index.json` and component `config.json` files.

What is recognised: SD1.x checkpoints (768-wide text encoder, 4 UNet input channels, epsilon
prediction) pass; SDXL, SD2.x (1024-wide OpenCLIP text encoder), inpainting or other UNets with more
than 4 input channels, v-prediction checkpoints (a `v_pred` key, modelspec metadata, or a `.yaml`
beside the file saying `parameterization: v`), textual-inversion embeddings, LoRA/LyCORIS files and bare
VAEs are each named. `classify_keys` also backs the loader's own check at job time (tifactory.families.sd15).

Import cost: standard library only.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tifactory.errors import TifactoryError
from tifactory.training.embedding import looks_like_embedding

SAFETENSORS_SUFFIXES = frozenset({".safetensors"})
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth"})
MAX_HEADER_BYTES = 100 * 2**20  # safetensors caps its header at 100 MB too
MAX_PICKLE_BYTES = 256 * 2**20  # an SD checkpoint's data.pkl is well under 1 MB
SD15_TEXT_WIDTH = 768
SD15_UNET_IN_CHANNELS = 4
SD15_LATENT_CHANNELS = 4

UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer."
VAE = "first_stage_model."
UNET_IN = UNET + "input_blocks.0.0.weight"
UNET_CROSS_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
TEXT_TOKEN_EMBEDDING_KEYS = (
    TEXT + "text_model.embeddings.token_embedding.weight",
    TEXT + "embeddings.token_embedding.weight",
)

# Globals an SD checkpoint's pickle may name; torch.load(weights_only=True) accepts these kinds.
_SAFE_PICKLE_MODULES = ("torch", "collections", "numpy", "_codecs")
_SAFE_BUILTINS = frozenset({"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "bool",
                            "bytes", "bytearray", "str", "slice", "range"})
_INERT_PICKLE_GLOBALS = frozenset({"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"})


class ModelCheckError(TifactoryError, ValueError):
    """A file cannot be inspected (unreadable header, truncated archive, ...)."""


@dataclass
class Inspection:
    """What a model file holds: tensor name -> shape, string metadata, pickle globals it names."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    unsafe_globals: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- reading

def read_safetensors_header(path: str | os.PathLike) -> Inspection:
    """Tensor shapes and metadata from a safetensors header (8-byte length + JSON); no data read."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelCheckError(f"{path} is too short to be a safetensors file ({len(prefix)} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > path.stat().st_size - 8:
                raise ModelCheckError(f"{path} is not a safetensors file (header length {length} does not fit)")
            header = json.loads(handle.read(length).decode("utf-8"))
    except OSError as error:
        raise ModelCheckError(f"cannot read {path}: {error}") from error
    except (UnicodeDecodeError, ValueError) as error:
        raise ModelCheckError(f"{path} is not a safetensors file (its header is not JSON: {error})") from error
    if not isinstance(header, dict):
        raise ModelCheckError(f"{path} is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
            raise ModelCheckError(f"{path} is not a safetensors file (entry {name!r} has no shape)")
        shapes[name] = tuple(entry["shape"])
    return Inspection(shapes=shapes, metadata={str(k): str(v) for k, v in metadata.items()})


class _Inert:
    """Stands for any object a pickle builds: accepts every call, holds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __setstate__(self, state):
        pass


@dataclass
class _TensorShape:
    shape: tuple[int, ...]


def _rebuild_tensor(storage, offset, size, *args, **kwargs):
    return _TensorShape(tuple(int(s) for s in size))


def _rebuild_parameter(data, *args, **kwargs):
    return data


class _ShapeUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl into plain containers and tensor shapes. Nothing is imported: every
    global maps to a local stand-in, so no code from the file can run."""

    def __init__(self, handle):
        super().__init__(handle)
        self.globals_seen: list[str] = []

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        self.globals_seen.append(qualified)
        if module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name.startswith("_rebuild_parameter"):
            return _rebuild_parameter
        if qualified == "torch._tensor._rebuild_from_type_v2":  # (rebuild function, type, its args, state)
            return lambda function, kind, args, state=None: function(*args)
        if qualified == "collections.OrderedDict":
            return dict
        if module == "builtins" and name in ("set", "frozenset", "list", "tuple", "dict"):
            return {"set": set, "frozenset": frozenset, "list": list, "tuple": tuple, "dict": dict}[name]
        return _Inert

    def persistent_load(self, pid):
        return _Inert()


def _unpickle_shapes(handle) -> tuple[object, list[str]]:
    unpickler = _ShapeUnpickler(handle)
    try:
        return unpickler.load(), unpickler.globals_seen
    except Exception as error:  # noqa: BLE001 - any failure of a hostile or broken pickle is a read error
        raise ModelCheckError(f"its pickle cannot be read ({type(error).__name__}: {error})") from None


def read_pickle_checkpoint(path: str | os.PathLike) -> Inspection:
    """Tensor shapes from a torch checkpoint's pickle (zip or legacy format), without torch."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [info for info in archive.infolist() if info.filename.endswith("data.pkl")
                           and info.filename.count("/") == 1]
                if not members:
                    raise ModelCheckError(f"{path} is a zip archive without a torch data.pkl")
                if members[0].file_size > MAX_PICKLE_BYTES:
                    raise ModelCheckError(f"{path}: its data.pkl is {members[0].file_size} bytes, too large to inspect")
                with archive.open(members[0]) as handle:
                    data, seen = _unpickle_shapes(handle)
        else:
            with open(path, "rb") as handle:
                data, seen = _unpickle_shapes(handle)
                if isinstance(data, int) and data == 0x1950A86A20F9469CFC6C:  # torch's legacy magic number
                    _unpickle_shapes(handle)  # protocol version
                    _unpickle_shapes(handle)  # system info
                    data, more = _unpickle_shapes(handle)
                    seen += more
    except ModelCheckError as error:
        message = str(error)
        raise ModelCheckError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise ModelCheckError(f"cannot read checkpoint {path}: {error}") from error
    shapes: dict[str, tuple[int, ...]] = {}
    _flatten(data, "", shapes)
    unsafe = sorted({name for name in seen if not _safe_global(name)})
    return Inspection(shapes=shapes, unsafe_globals=unsafe)


def _flatten(data, prefix: str, out: dict) -> None:
    """Nested dicts -> dotted keys; a top-level (or nested) 'state_dict' is unwrapped as the loader does."""
    if not isinstance(data, dict):
        return
    if isinstance(data.get("state_dict"), dict):
        _flatten(data["state_dict"], prefix, out)
        return
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, _TensorShape):
            out[prefix + key] = value.shape
        elif isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)


def _safe_global(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    if name in _INERT_PICKLE_GLOBALS:
        return True
    if module == "builtins":
        return attribute in _SAFE_BUILTINS
    return module.split(".")[0] in _SAFE_PICKLE_MODULES


def inspect_file(path: str | os.PathLike) -> Inspection:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors_header(path)
    if suffix in PICKLE_SUFFIXES:
        return read_pickle_checkpoint(path)
    raise ModelCheckError(f"{path} has an unsupported extension {path.suffix!r}: expected a diffusers folder, "
                          "a .safetensors file or a .ckpt/.pt/.pth file")


# --------------------------------------------------------------------------------------------- verdicts

def _has(shapes: dict, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in shapes)


def _examples(shapes: dict, count: int = 3) -> str:
    keys = sorted(shapes)[:count]
    return ", ".join(keys) + (", ..." if len(shapes) > count else "")


def non_model_kind(shapes: dict) -> str | None:
    """'a textual-inversion embedding', 'a LoRA', 'a VAE' ... for files that are not full models."""
    keys = list(shapes)
    lowered = [key.lower() for key in keys]
    if _has(shapes, UNET):
        return None
    if looks_like_embedding(keys):
        return "a textual-inversion embedding"
    if any("lora" in k or ".hada_" in k or "lokr" in k or k.startswith("lycoris_") for k in lowered):
        return "a LoRA/LyCORIS network"
    if _has(shapes, "encoder.") and _has(shapes, "decoder.") or _has(shapes, VAE):
        return "a VAE"
    if _has(shapes, "down_blocks.") or _has(shapes, "text_model.") or _has(shapes, "conditioner."):
        return None
    return "not a Stable Diffusion checkpoint"


@dataclass
class Verdict:
    """What a model file or folder is instead of SD1.x: `found` is a phrase ("an SDXL checkpoint (...)");
    `architecture` is True for a diffusion model of another architecture (SDXL, SD2.x, inpainting,
    v-prediction), False for a file that is no full model at all (embedding, LoRA, VAE, other)."""

    found: str
    architecture: bool


def classify_keys(shapes: dict, metadata: dict | None = None) -> Verdict | None:
    """None for an SD1.x original-layout checkpoint, else what the file is instead."""
    metadata = metadata or {}
    if _has(shapes, "conditioner.embedders."):
        return Verdict("an SDXL checkpoint (conditioner.embedders.* keys)", True)
    if _has(shapes, "cond_stage_model.model."):
        width = shapes.get("cond_stage_model.model.token_embedding.weight", (None, "?"))[-1]
        return Verdict(f"a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*, "
                       f"{width} wide)", True)
    kind = non_model_kind(shapes)
    if kind is not None:
        return Verdict(f"{kind}, not a full model (found {len(shapes)} tensor(s): {_examples(shapes)})", False)
    if not _has(shapes, UNET):
        if _has(shapes, "down_blocks.") or _has(shapes, "text_model."):
            return Verdict("a diffusers component weights file, not a single-file checkpoint (pass the "
                           "diffusers folder itself)", False)
        return Verdict(f"not an original-layout SD1.x checkpoint (no model.diffusion_model.* keys; found "
                       f"{_examples(shapes)})", False)
    if UNET + "label_emb.0.0.weight" in shapes:
        return Verdict("an SDXL-style checkpoint (UNet label_emb: size conditioning)", True)
    cross = shapes.get(UNET_CROSS_K)
    if cross is not None and len(cross) == 2 and cross[1] != SD15_TEXT_WIDTH:
        version = "2.x" if cross[1] == 1024 else "non-1.x"
        return Verdict(f"an SD {version} checkpoint (UNet cross-attention {cross[1]} wide, SD1.5's is "
                       f"{SD15_TEXT_WIDTH})", True)
    for key in TEXT_TOKEN_EMBEDDING_KEYS:
        if key in shapes and shapes[key][-1] != SD15_TEXT_WIDTH:
            return Verdict(f"a checkpoint with a {shapes[key][-1]}-wide text encoder (SD1.5's is "
                           f"{SD15_TEXT_WIDTH})", True)
    unet_in = shapes.get(UNET_IN)
    if unet_in is not None and len(unet_in) == 4 and unet_in[1] != SD15_UNET_IN_CHANNELS:
        what = "an inpainting" if unet_in[1] == 9 else "a"
        return Verdict(f"{what} checkpoint (UNet with {unet_in[1]} input channels, SD1.5's has "
                       f"{SD15_UNET_IN_CHANNELS})", True)
    if "v_pred" in shapes:
        return Verdict("a v-prediction checkpoint (it has a v_pred key)", True)
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if prediction in ("v", "v_prediction", "v-prediction"):
        return Verdict(f"a v-prediction checkpoint (metadata modelspec.prediction_type = {prediction})", True)
    if not _has(shapes, TEXT):
        return Verdict("an SD1.x checkpoint without text encoder weights (no cond_stage_model.transformer.* "
                       "keys)", False)
    return None


def _sibling_yaml_prediction(path: Path) -> Verdict | None:
    """A1111's convention: `model.yaml` beside `model.safetensors`; `parameterization: "v"` = v-prediction."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        text = yaml_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.MULTILINE):
        return Verdict(f"a v-prediction checkpoint ({yaml_path.name} beside it says parameterization: v)", True)
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelCheckError(f"cannot read {path}: {error}") from error
    return data if isinstance(data, dict) else {}


def classify_folder(folder: Path, *, need_vae: bool) -> Verdict | None:
    """None for an SD1.x diffusers folder, else what it is instead."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name", ""))
    if "XL" in pipeline or (folder / "text_encoder_2").is_dir():
        return Verdict(f"an SDXL diffusers folder ({pipeline or 'text_encoder_2/'})", True)
    required = ["unet", "text_encoder", "tokenizer"] + (["vae"] if need_vae else [])
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        own_config = folder / "config.json"
        if own_config.is_file() and "AutoencoderKL" in str(_read_json(own_config).get("_class_name", "")):
            return Verdict("a diffusers VAE folder, not a full model", False)
        return Verdict(f"not a diffusers Stable Diffusion folder (missing {missing}; expected model_index.json, "
                       "unet/, vae/, text_encoder/, tokenizer/, scheduler/)", False)
    verdict = _classify_config_parts(folder)
    if verdict:
        return verdict
    scheduler = folder / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        prediction = _read_json(scheduler).get("prediction_type") or "epsilon"
        if prediction != "epsilon":
            return Verdict(f"a {prediction} model (scheduler/scheduler_config.json prediction_type = "
                           f"{prediction})", True)
    return None


def _classify_config_parts(folder: Path) -> Verdict | None:
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file():
        unet = _read_json(unet_config)
        if unet.get("addition_embed_type") == "text_time":
            return Verdict("an SDXL model (unet/config.json addition_embed_type = text_time)", True)
        cross = unet.get("cross_attention_dim")
        if isinstance(cross, int) and cross != SD15_TEXT_WIDTH:
            return Verdict(f"an SD {'2.x' if cross == 1024 else 'non-1.x'} model (unet cross_attention_dim = "
                           f"{cross})", True)
        channels = unet.get("in_channels")
        if isinstance(channels, int) and channels != SD15_UNET_IN_CHANNELS:
            what = "an inpainting" if channels == 9 else "a"
            return Verdict(f"{what} model (unet in_channels = {channels}, SD1.5's is {SD15_UNET_IN_CHANNELS})",
                           True)
    text_config = folder / "text_encoder" / "config.json"
    if text_config.is_file():
        width = _read_json(text_config).get("hidden_size")
        if isinstance(width, int) and width != SD15_TEXT_WIDTH:
            return Verdict(f"a model with a {width}-wide text encoder (text_encoder/config.json; SD1.5's is "
                           f"{SD15_TEXT_WIDTH})", True)
    return None


# --------------------------------------------------------------------------------------------- families

SDXL_TEXT = "conditioner.embedders.0.transformer."  # CLIP-L, transformers' names
SDXL_TEXT_2 = "conditioner.embedders.1.model."  # OpenCLIP bigG
SDXL_WIDTHS = {SDXL_TEXT + "text_model.embeddings.token_embedding.weight": 768,
               SDXL_TEXT_2 + "token_embedding.weight": 1280,
               UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": 2048}
EDM_KEYS = ("edm_mean", "edm_std")


@dataclass(frozen=True)
class FamilyVerdict:
    """Which model family a file or folder is (`family` "sd15" | "sdxl"), or why it is refused (`refused`,
    a Verdict naming the tensor or config key that tells; then `family` is None)."""

    family: str | None
    refused: Verdict | None = None


def detect_family_keys(shapes: dict, metadata: dict | None = None) -> FamilyVerdict:
    """The family of an original-layout checkpoint from its tensor names and shapes (and metadata)."""
    metadata = metadata or {}
    edm = [key for key in EDM_KEYS if key in shapes]
    if edm:
        return FamilyVerdict(None, Verdict(f"an EDM model such as Playground v2.5 (it has {' and '.join(edm)} "
                                           "keys; its noise schedule is not SD's)", True))
    if not _has(shapes, "conditioner.embedders."):
        verdict = classify_keys(shapes, metadata)
        return FamilyVerdict(None if verdict else "sd15", verdict)
    if not _has(shapes, SDXL_TEXT) and _has(shapes, "conditioner.embedders.0.model."):
        return FamilyVerdict(None, Verdict("an SDXL refiner (conditioner.embedders.0 is OpenCLIP bigG, "
                                           "conditioner.embedders.0.model.*; it has no CLIP-L text encoder)", True))
    for prefix, what in ((UNET, "UNet"), (SDXL_TEXT, "CLIP-L text encoder"), (SDXL_TEXT_2, "OpenCLIP bigG text encoder")):
        if not _has(shapes, prefix):
            return FamilyVerdict(None, Verdict(f"an SDXL checkpoint without its {what} ({prefix}* keys)", False))
    if "v_pred" in shapes:
        return FamilyVerdict(None, Verdict("a v-prediction SDXL checkpoint (it has a v_pred key)", True))
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if prediction in ("v", "v_prediction", "v-prediction"):
        return FamilyVerdict(None, Verdict(f"a v-prediction SDXL checkpoint (metadata modelspec.prediction_type = "
                                           f"{prediction})", True))
    unet_in = shapes.get(UNET_IN)
    if unet_in is not None and len(unet_in) == 4 and unet_in[1] != SD15_UNET_IN_CHANNELS:
        what = "an SDXL inpainting" if unet_in[1] == 9 else "an SDXL"
        return FamilyVerdict(None, Verdict(f"{what} checkpoint ({UNET_IN} has {unet_in[1]} input channels, "
                                           f"not {SD15_UNET_IN_CHANNELS})", True))
    for key, width in SDXL_WIDTHS.items():
        if key in shapes and shapes[key][-1] != width:
            return FamilyVerdict(None, Verdict(f"not SDXL's architecture ({key} is {shapes[key][-1]} wide, "
                                               f"SDXL's is {width})", True))
    return FamilyVerdict("sdxl")


def detect_family_folder(folder: Path, *, need_vae: bool) -> FamilyVerdict:
    """The family of a diffusers folder from model_index.json and the component configs."""
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    unet = _read_json(folder / "unet" / "config.json") if (folder / "unet" / "config.json").is_file() else {}
    sdxl = ((folder / "text_encoder_2").is_dir() or "XL" in str(index.get("_class_name", ""))
            or unet.get("addition_embed_type") == "text_time")
    if not sdxl:
        verdict = classify_folder(folder, need_vae=need_vae)
        return FamilyVerdict(None if verdict else "sd15", verdict)
    if not (folder / "text_encoder").is_dir():
        return FamilyVerdict(None, Verdict("an SDXL refiner (no text_encoder/: only the OpenCLIP bigG text_encoder_2, "
                                           "no CLIP-L)", True))
    required = ["unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] + (["vae"] if need_vae else [])
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        return FamilyVerdict(None, Verdict(f"an incomplete SDXL diffusers folder (missing {missing})", False))
    channels = unet.get("in_channels")
    if isinstance(channels, int) and channels != SD15_UNET_IN_CHANNELS:
        what = "an SDXL inpainting" if channels == 9 else "an SDXL"
        return FamilyVerdict(None, Verdict(f"{what} model (unet/config.json in_channels = {channels}, not "
                                           f"{SD15_UNET_IN_CHANNELS})", True))
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    if str(scheduler.get("_class_name", "")).startswith("EDM"):
        return FamilyVerdict(None, Verdict(f"an EDM model such as Playground v2.5 (scheduler/scheduler_config.json "
                                           f"_class_name = {scheduler['_class_name']})", True))
    prediction = scheduler.get("prediction_type") or "epsilon"
    if prediction != "epsilon":
        return FamilyVerdict(None, Verdict(f"a {prediction} SDXL model (scheduler/scheduler_config.json "
                                           f"prediction_type = {prediction})", True))
    for part, key, width in (("text_encoder", "hidden_size", 768), ("text_encoder_2", "hidden_size", 1280),
                             ("unet", "cross_attention_dim", 2048)):
        config = _read_json(folder / part / "config.json") if (folder / part / "config.json").is_file() else {}
        if isinstance(config.get(key), int) and config[key] != width:
            return FamilyVerdict(None, Verdict(f"not SDXL's architecture ({part}/config.json {key} = {config[key]}, "
                                               f"SDXL's is {width})", True))
    return FamilyVerdict("sdxl")


def check_model_family(path: str, key: str = "base_model", *, has_vae_override: bool = False
                       ) -> tuple[str | None, list[str]]:
    """(family, problems) of a base model: "sd15" or "sdxl" with no problems, or None and messages that
    each name the config key and the tensor or config key that gave the model away."""
    if not path:
        return None, [f"{key}: empty; set it to an SD1.5 or SDXL diffusers folder or .safetensors/.ckpt file"]
    location = Path(os.path.expanduser(path))
    if not location.exists():
        return None, [f"{key}: {path} does not exist"]
    try:
        if location.is_dir():
            found = detect_family_folder(location, need_vae=not has_vae_override)
        else:
            inspection = inspect_file(location)
            if inspection.unsafe_globals:
                return None, [f"{key}: {path} is {_unsafe_message(inspection)}"]
            found = detect_family_keys(inspection.shapes, inspection.metadata)
            if found.family == "sd15" and (verdict := _sibling_yaml_prediction(location)):
                found = FamilyVerdict(None, verdict)
            if found.family and not has_vae_override and not _has(inspection.shapes, VAE):
                return None, [f"{key}: {path} has no VAE weights (first_stage_model.*); set vae to a VAE file or folder"]
    except ModelCheckError as error:
        return None, [f"{key}: {error}"]
    if found.refused is None:
        return found.family, []
    if not found.refused.architecture:
        return None, [_message(key, path, found.refused)]
    return None, [f"{key}: {path} is {found.refused.found}; tifactory trains textual inversions for SD1.5 and SDXL "
                  "(base and finetunes such as Pony or Illustrious), epsilon prediction"]


# --------------------------------------------------------------------------------------------- checks

def _message(key: str, path: str, verdict: Verdict) -> str:
    if verdict.architecture:
        return f"{key}: {path} is {verdict.found}; SD1.5 only (tifactory trains SD1.x textual inversions)"
    advice = ""
    if verdict.found.startswith(("a VAE", "a diffusers VAE")):
        advice = "; a VAE goes in the config key vae"
    elif verdict.found.startswith(("a textual-inversion", "a LoRA")):
        advice = f"; {key} must be a full SD1.5 checkpoint such as v1-5-pruned-emaonly.safetensors"
    return f"{key}: {path} is {verdict.found}{advice}"


# The family (tifactory.families.FAMILIES) of a model the classification accepts (a verdict of None).
ACCEPTED_FAMILY = "sd15"


def base_model_family(path: str, key: str = "base_model", *,
                      has_vae_override: bool = False) -> tuple[str | None, list[str]]:
    """(the model family's name, []) for a usable base model (diffusers folder or single file), else
    (None, problems), each problem naming the config key."""
    if not path:
        return None, [f"{key}: empty; set it to an SD1.5 diffusers folder or .safetensors/.ckpt file"]
    location = Path(os.path.expanduser(path))
    if not location.exists():
        return None, [f"{key}: {path} does not exist"]
    try:
        if location.is_dir():
            verdict = classify_folder(location, need_vae=not has_vae_override)
        else:
            inspection = inspect_file(location)
            if inspection.unsafe_globals:
                return None, [f"{key}: {path} is {_unsafe_message(inspection)}"]
            verdict = classify_keys(inspection.shapes, inspection.metadata) or _sibling_yaml_prediction(location)
            if verdict is None and not has_vae_override and not _has(inspection.shapes, VAE):
                return None, [f"{key}: {path} has no VAE weights (first_stage_model.*); set vae to a VAE file or "
                              "folder"]
    except ModelCheckError as error:
        return None, [f"{key}: {error}"]
    return (ACCEPTED_FAMILY, []) if verdict is None else (None, [_message(key, path, verdict)])


def check_base_model(path: str, key: str = "base_model", *, has_vae_override: bool = False) -> list[str]:
    """Problems with a base model (diffusers folder or single file), each naming the config key."""
    return base_model_family(path, key, has_vae_override=has_vae_override)[1]


def _unsafe_message(inspection: Inspection) -> str:
    return (f"a pickle that names code beyond tensors ({', '.join(inspection.unsafe_globals[:3])}); it is "
            "not loaded (it could run code). Convert it to .safetensors in an environment you trust")


def check_vae(path: str, key: str = "vae") -> list[str]:
    """Problems with a VAE override (diffusers folder, or a single file with the VAE's weights)."""
    location = Path(os.path.expanduser(path))
    if not location.exists():
        return [f"{key}: {path} does not exist"]
    if location.is_dir():
        for config_path in (location / "config.json", location / "vae" / "config.json"):
            if config_path.is_file():
                try:
                    config = _read_json(config_path)
                except ModelCheckError as error:
                    return [f"{key}: {error}"]
                latent = config.get("latent_channels", SD15_LATENT_CHANNELS)
                if latent != SD15_LATENT_CHANNELS:
                    return [f"{key}: {path} is a VAE with {latent} latent channels; SD1.5's has "
                            f"{SD15_LATENT_CHANNELS}"]
                return []
        return [f"{key}: {path} is not a diffusers AutoencoderKL folder (no config.json or vae/config.json)"]
    try:
        inspection = inspect_file(location)
    except ModelCheckError as error:
        return [f"{key}: {error}"]
    if inspection.unsafe_globals:
        return [f"{key}: {path} is {_unsafe_message(inspection)}"]
    shapes = inspection.shapes
    bare = {}
    for prefix in (VAE, "vae.", ""):
        bare = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix + "encoder.")
                or k.startswith(prefix + "decoder.")}
        if bare:
            break
    if not bare:
        kind = non_model_kind(shapes)
        if kind is None:
            kind = "a model without VAE weights"
        elif kind.startswith("not "):
            kind = "a file without VAE weights"
        return [f"{key}: {path} is {kind}, not a VAE (no encoder.*/decoder.* weights; found {_examples(shapes)})"]
    conv_out = bare.get("encoder.conv_out.weight")
    if conv_out is not None and len(conv_out) == 4 and conv_out[0] != 2 * SD15_LATENT_CHANNELS:
        return [f"{key}: {path} is a VAE with {conv_out[0] // 2} latent channels; SD1.5's has "
                f"{SD15_LATENT_CHANNELS}"]
    return []


def check_config_dir(path: str, key: str = "base_model_config") -> list[str]:
    """A `base_model_config` override: a diffusers-format SD1.5 folder (configs + tokenizer suffice)."""
    folder = Path(os.path.expanduser(path))
    if not folder.is_dir():
        return [f"{key}: {path} is not a folder"]
    needed = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"]
    missing = [part for part in needed if not (folder / part).exists()]
    if missing:
        return [f"{key}: {path} is not a usable diffusers SD1.5 config folder: missing {missing}"]
    try:
        verdict = _classify_config_parts(folder)
    except ModelCheckError as error:
        return [f"{key}: {error}"]
    return [f"{key}: {path} describes {verdict.found}; SD1.5 only"] if verdict else []


def check_models(config: dict) -> list[str]:
    """Every model problem of a config (base model, its config folder, VAE, eval models), key named."""
    return model_specs(config, demo_model_dir="")[1]


def model_specs(config: dict, *, demo_model_dir: str) -> tuple[dict, list[str]]:
    """({"base": the base model's ModelSpec, <eval model name>: its ModelSpec, ...}, problems): each model's
    family detected from its files (the demo model, built by a job in `demo_model_dir`, is the roster's
    DEMO_MODEL_FAMILY); an eval model of another family than the base model is a problem. Parse-time cheap
    (headers and configs only)."""
    from tifactory.families import ModelSpec
    from tifactory.roster import DEMO_MODEL_FAMILY, DEMO_MODEL_NAME

    specs: dict = {}
    problems: list[str] = []
    entries = [("base", config.get("base_model", ""), config.get("base_model_config", ""), config.get("vae", ""),
                "base_model", "base_model_config", "vae")]
    for index, entry in enumerate(config.get("eval_models") or []):
        where = f"eval_models[{index}] ({entry.get('name', '?')})"
        entries.append((entry.get("name", f"eval{index}"), entry.get("path", ""), entry.get("config", ""),
                        entry.get("vae", ""), f"{where}.path", f"{where}.config", f"{where}.vae"))
    for name, path, config_dir, vae, key, config_key, vae_key in entries:
        if name == "base" and path == DEMO_MODEL_NAME:
            specs[name] = ModelSpec(path=demo_model_dir or DEMO_MODEL_NAME, family=DEMO_MODEL_FAMILY)
            continue
        family, found = base_model_family(path, key, has_vae_override=bool(vae))
        if config_dir:
            found += check_config_dir(config_dir, config_key)
        if vae:
            found += check_vae(vae, vae_key)
        problems += found
        if not found and family is not None:
            specs[name] = ModelSpec(path=os.path.expanduser(path), family=family,
                                    config_dir=os.path.expanduser(config_dir), vae=os.path.expanduser(vae))
    base = specs.get("base")
    for name, spec in specs.items():
        if base is not None and name != "base" and spec.family != base.family:
            problems.append(f"eval model {name} ({spec.path}) is a {spec.family} model, the base model a "
                            f"{base.family} one: an embedding works only on models of its own family")
    return specs, problems


def tokenizer_folder(config: dict, *, demo_model_dir: str | None = None,
                     demo_model_name: str = "demo-tiny") -> Path | None:
    """The tokenizer folder the training job will load for the base model (None: not built yet)."""
    from tifactory.training import sd15

    base = config.get("base_model", "")
    if base == demo_model_name:
        folder = Path(demo_model_dir or "") / "tokenizer"
        built = demo_model_dir and any((folder / name).is_file() for name in ("vocab.json", "tokenizer.json"))
        return folder if built else None
    base_path = Path(os.path.expanduser(base))
    if base_path.is_dir():
        return base_path / "tokenizer"
    if config.get("base_model_config"):
        return Path(os.path.expanduser(config["base_model_config"])) / "tokenizer"
    return sd15.SD15_DIR / "tokenizer"


def check_subject_tokens(num_vectors: dict[str, int], tokenizer_dir: Path | None) -> tuple[list[str], list[str]]:
    """(notes, problems) for every subject's training tokens, from the tokenizer's vocabulary file.

    A subject whose name the tokenizer already knows trains under a derived token (notes say which);
    a problem means no token could be derived, or the vocabulary is unreadable. `tokenizer_dir` None
    (the demo model before it is built) checks nothing."""
    from tifactory.training.sd15 import SD15ResourceError, read_vocab
    from tifactory.training.templates import training_tokens

    if tokenizer_dir is None:
        return [], []
    try:
        vocab = read_vocab(tokenizer_dir)
    except SD15ResourceError as error:
        return [], [str(error)]
    notes, problems = [], []
    for subject, count in num_vectors.items():
        try:
            tokens, note = training_tokens(subject, count, vocab)
        except ValueError as error:
            problems.append(str(error))
            continue
        if note:
            notes.append(f"{subject} -> {tokens[0]}")
    return notes, problems
