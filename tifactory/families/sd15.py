"""Stable Diffusion 1.x (SD1.5): one CLIP ViT-L/14 text encoder, 768 wide; 512 px; epsilon prediction.

`SD15.load` reads, offline,

* a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
* one `.safetensors` file in the original SD1.x (CompVis/LDM) layout, or a `.ckpt`/`.pt`/`.pth` file in that
  layout (read with `torch.load(weights_only=True)`): its keys map onto diffusers' with diffusers' own
  LDM conversion (UNet, VAE) and the CLIP prefix below (text encoder).

A single file carries weights only: the configs and the tokenizer come from the spec's `config_dir` when given
(config key `base_model_config`: a local diffusers-format folder of the same architecture; only its
*.json/*.txt files are read), else from SD1.5's configs and CLIP tokenizer shipped in resources/sd15/
(tifactory.training.sd15). The family's text parts (`text_folders`, `text_encoder_class`,
`text_encoder_state_dict`) are the places a family with more encoders overrides.

Import cost: no torch/diffusers/transformers at import time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tifactory.families.base import Components, Family
from tifactory.families.loading import (
    ModelLoadError,
    Placement,
    SINGLE_FILE_SUFFIXES,
    convert,
    guarded,
    instantiate,
    load_vae_folder,
    load_vae_override,
    read_checkpoint,
    read_json,
    stay_offline,
    unknown_extension_message,
    variant,
)

logger = logging.getLogger(__name__)

LDM_TEXT_PREFIX = "cond_stage_model.transformer."
LDM_VAE_PREFIX = "first_stage_model."


class SD15(Family):
    name = "sd15"
    architecture = "stable-diffusion-v1/textual-inversion"
    native_resolution = 512
    latent_scale = 0.18215
    noise_schedule = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }
    # (tokenizer folder, text encoder folder) per encoder, in encoder order
    text_folders: tuple[tuple[str, str], ...] = (("tokenizer", "text_encoder"),)
    title = "Stable Diffusion 1.5"

    # ------------------------------------------------------------------ what differs in a subclass

    def shipped_config_dir(self) -> Path:
        """The family's configs and tokenizers shipped in resources/ (describe a single file)."""
        from tifactory.training import sd15

        try:
            return sd15.config_dir()
        except sd15.SD15ResourceError as error:
            raise ModelLoadError(str(error)) from None

    def text_encoder_class(self, index: int):
        """The transformers class of text encoder `index`."""
        from transformers import CLIPTextModel

        return CLIPTextModel

    def text_encoder_state_dict(self, checkpoint: dict, index: int, model) -> dict:
        """Text encoder `index`'s weights of an original-layout file in the model's own key spelling:
        cond_stage_model.transformer[.text_model].* for SD1.x."""
        wrapped = hasattr(model, "text_model")
        out = {}
        for key, tensor in checkpoint.items():
            if not key.startswith(LDM_TEXT_PREFIX):
                continue
            bare = key.removeprefix(LDM_TEXT_PREFIX).removeprefix("text_model.")
            if bare.endswith("position_ids"):
                continue  # a non-persistent buffer in current transformers
            out[f"text_model.{bare}" if wrapped else bare] = tensor
        return out

    def check_layout(self, checkpoint: dict, path: Path, *, need_vae: bool) -> None:
        """The DAG-time verdict (tifactory.training.model_check) again on the loaded tensors."""
        from tifactory.training.model_check import classify_keys

        verdict = classify_keys({key: tuple(tensor.shape) for key, tensor in checkpoint.items()})
        if verdict is not None:
            only = f"; it is not a {self.title} model" if verdict.architecture else ""
            raise ModelLoadError(f"{path} is {verdict.found}{only}")
        if need_vae and not any(k.startswith(LDM_VAE_PREFIX) for k in checkpoint):
            raise ModelLoadError(f"{path} has no VAE weights ({LDM_VAE_PREFIX}*); pass a separate vae")

    # ------------------------------------------------------------------ loading

    def load(self, spec, *, device=None, unet_dtype=None) -> Components:
        stay_offline()
        base = Path(spec.path)
        if not base.exists():
            raise ModelLoadError(f"base model not found: {base}")
        place = Placement.of(device, unet_dtype)
        skip_vae = bool(spec.vae)
        if base.is_dir():
            loaded = self.load_folder(base, skip_vae=skip_vae, place=place)
        elif base.suffix.lower() in SINGLE_FILE_SUFFIXES:
            loaded = self.load_single_file(base, spec.config_dir, skip_vae=skip_vae, place=place)
        else:
            raise ModelLoadError(unknown_extension_message(base, "base model"))
        if spec.vae:
            loaded["vae"] = load_vae_override(Path(spec.vae), loaded["vae_config"], place=place)
        return Components(tokenizers=loaded["tokenizers"], text_encoders=loaded["text_encoders"],
                          vae=loaded["vae"], unet=loaded["unet"],
                          noise_scheduler=self.noise_scheduler(loaded["scheduler_config"]))

    def load_folder(self, base: Path, *, skip_vae: bool, place: Placement) -> dict:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        required = ["unet", *(name for pair in self.text_folders for name in pair)] + ([] if skip_vae else ["vae"])
        missing = [name for name in required if not (base / name).is_dir()]
        if missing:
            raise ModelLoadError(
                f"{base} is not a diffusers {self.title} folder: missing sub-folder(s) {missing} "
                f"(expected model_index.json, unet/, vae/, {', '.join(f'{name}/' for name in required[1:])}, "
                "scheduler/)")
        out: dict = {"tokenizers": [], "text_encoders": []}
        for index, (tokenizer_folder, encoder_folder) in enumerate(self.text_folders):
            out["tokenizers"].append(self.load_tokenizer(base, tokenizer_folder))
            encoder_class = self.text_encoder_class(index)
            out["text_encoders"].append(guarded(
                "text encoder", base / encoder_folder,
                lambda: encoder_class.from_pretrained(
                    base, subfolder=encoder_folder, local_files_only=True, dtype=torch.float32,
                    variant=variant(base / encoder_folder, "model"), device_map=place.device_map()),
            ).eval())
        out["unet"] = guarded(
            "UNet", base / "unet",
            lambda: UNet2DConditionModel.from_pretrained(
                base, subfolder="unet", local_files_only=True, torch_dtype=place.unet_dtype,
                variant=variant(base / "unet", "diffusion_pytorch_model"), device_map=place.device_map()),
        ).eval()
        if (base / "vae" / "config.json").is_file():
            out["vae_config"] = dict(AutoencoderKL.load_config(base / "vae", local_files_only=True))
        else:
            out["vae_config"] = None
        out["vae"] = None if skip_vae else load_vae_folder(base / "vae", place)
        out["scheduler_config"] = read_json(base / "scheduler" / "scheduler_config.json")
        return out

    @staticmethod
    def load_tokenizer(folder: Path, subfolder: str):
        from transformers import CLIPTokenizer

        return guarded("tokenizer", folder / subfolder,
                       lambda: CLIPTokenizer.from_pretrained(folder, subfolder=subfolder, local_files_only=True))

    def resolve_config_dir(self, config_dir: str, checkpoint_path: Path) -> Path:
        """`config_dir` (config key base_model_config) when given, else the family's shipped configs."""
        if not config_dir:
            folder = self.shipped_config_dir()
            logger.info("describing %s with the shipped %s configs in %s", checkpoint_path, self.title, folder)
            return folder
        folder = Path(config_dir)
        needed = ["unet/config.json", "vae/config.json",
                  *(part for tokenizer, encoder in self.text_folders for part in (f"{encoder}/config.json", tokenizer))]
        missing = ([f"the folder itself ({folder} does not exist)"] if not folder.is_dir()
                   else [part for part in needed if not (folder / part).exists()])
        if missing:
            raise ModelLoadError(f"config_dir {folder} is not a usable diffusers {self.title} folder: "
                                 f"missing {missing}")
        return folder

    def load_single_file(self, path: Path, config_dir: str, *, skip_vae: bool, place: Placement) -> dict:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

        cfg = self.resolve_config_dir(config_dir, path)  # before reading a multi-GB file
        unet_config = guarded("UNet config", cfg / "unet",
                              lambda: dict(UNet2DConditionModel.load_config(cfg / "unet")))
        vae_config = guarded("VAE config", cfg / "vae", lambda: dict(AutoencoderKL.load_config(cfg / "vae")))
        text_configs = []
        for index, (_, encoder_folder) in enumerate(self.text_folders):
            config_class = self.text_encoder_class(index).config_class
            text_configs.append(guarded(
                "text encoder config", cfg / encoder_folder,
                lambda: config_class.from_pretrained(cfg / encoder_folder, local_files_only=True)))
        tokenizers = [self.load_tokenizer(cfg, tokenizer_folder) for tokenizer_folder, _ in self.text_folders]

        checkpoint = read_checkpoint(path, device=place.map_location)  # conversion runs where the weights go
        self.check_layout(checkpoint, path, need_vae=not skip_vae)
        described_by = f"the configs in {cfg}"
        out: dict = {"tokenizers": tokenizers, "vae_config": vae_config, "text_encoders": []}
        out["unet"] = instantiate(
            lambda: UNet2DConditionModel.from_config(unet_config),
            convert(lambda: convert_ldm_unet_checkpoint(checkpoint, unet_config), "UNet", path),
            "UNet", path, described_by, place.device, place.unet_dtype)
        for index, text_config in enumerate(text_configs):
            encoder_class = self.text_encoder_class(index)
            out["text_encoders"].append(instantiate(
                lambda: encoder_class(text_config),
                lambda model: self.text_encoder_state_dict(checkpoint, index, model),
                "text encoder", path, described_by, place.device, torch.float32))
        out["vae"] = None
        if not skip_vae:
            out["vae"] = instantiate(
                lambda: AutoencoderKL.from_config(vae_config),
                convert(lambda: convert_ldm_vae_checkpoint(checkpoint, vae_config), "VAE", path),
                "VAE", path, described_by, place.device, torch.float32)
        out["scheduler_config"] = read_json(cfg / "scheduler" / "scheduler_config.json")
        return out
