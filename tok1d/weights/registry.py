"""Released weights by name: where each official file lives, how to check it and how it converts.

    tok1d.weights.load("titok_l32")             # (model, params): fetched, checked, converted, cached
    tok1d convert --from rar_b                  # the same, from the command line

Every entry names its official source: a Hugging Face Hub file (`hf://owner/repo/file`), the
canonical URL of a release asset, or (GigaTok, on Google Drive) a page to download by hand. A
`sha256` is recorded only where it is published: torch.hub-style file names carry the first
eight hex digits of the file's sha256 (torchvision's `vgg16-397923af.pth`, pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`), and that prefix is checked; elsewhere it is None (the
converter's key and shape check, and `expect`, still refuse a file that is not what the name
says). `kind` and `options` are the converter's (`tok1d convert KIND --FLAG=...`); `expect` are
model arguments the converted model must have; `paper` are the numbers the authors report.

The table is data only; `tok1d.weights.download` fetches and checks files, and
`tok1d.weights.loaders.resolve` converts them into the cache.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import urllib.parse
from typing import Any, Mapping, Optional

from tok1d import errors


@dataclasses.dataclass(frozen=True)
class File:
    """One official file. `source`: `hf://owner/repo/path`, an https URL, or (with `manual`) the
    page to download it from by hand. `sha256`: the full digest or a published prefix (>= 8 hex
    digits), None when none is published. `package`: (pip package, path inside it) of a package
    that ships the file (used when installed, before any download)."""
    source: str
    sha256: Optional[str] = None
    manual: bool = False
    filename: str = ""
    package: Optional[tuple[str, str]] = None
    folder: str = ""  # under the host's download folder: a URL's digest (`file_of`)

    @property
    def name(self) -> str:
        """The file's own name (the manual-download location ends in it)."""
        return self.filename or self.source.rstrip("/").split("/")[-1].split("?")[0]


@dataclasses.dataclass(frozen=True)
class Released:
    """A released checkpoint. `files` maps the converter's inputs ("checkpoint", and "vgg" for
    LPIPS) to their File; `kind` is None for a file used as it is (the DINO discriminator's
    trunk, read by `tok1d.weights.loaders.load_disc_trunk`)."""
    name: str
    kind: Optional[str]
    files: Mapping[str, File]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    expect: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper: str = ""
    description: str = ""
    tokenizer: str = ""  # a generator's: the released tokenizer whose codes it was trained on


class UnknownName(errors.UserError, FileNotFoundError):
    """A name that is neither a released checkpoint nor an existing path."""


RELEASED: dict[str, Released] = {}


def _add(entry: Released) -> None:
    RELEASED[entry.name] = entry


def get(name: str) -> Released:
    """The entry of a released name; UnknownName (with the closest names) otherwise."""
    if name in RELEASED:
        return RELEASED[name]
    close = difflib.get_close_matches(name, list(RELEASED), n=3, cutoff=0.6)
    hint = f"did you mean {' / '.join(close)}? " if close else ""
    raise UnknownName(f"{name!r} is not a released checkpoint name nor an existing path; {hint}"
                      f"known names: {', '.join(sorted(RELEASED))}.")


# torch.hub's convention: NAME-<the first 8 or more hex digits of the file's sha256>.pth, on
# torch's own model host only (elsewhere such a tail is as likely a date or a step number).
_HUB_STYLE_DIGEST = re.compile(r"-([0-9a-f]{8,64})\.pth?$")
_HUB_STYLE_HOSTS = ("download.pytorch.org",)


def file_of(source: str) -> File:
    """The File of a Hub reference or URL: the table's own (with its sha256, its package) when
    an entry has that source, else a new one, kept in a folder of its own (a digest of the URL:
    two URLs with the same host and file name are different files) and checked against the
    digest prefix of a torch.hub-style URL on torch's host (`vgg16-397923af.pth`)."""
    for entry in RELEASED.values():
        for f in entry.files.values():
            if f.source == source:
                return f
    if source.startswith("hf://"):
        return File(source)  # kept under its repository and path: unique already
    url = urllib.parse.urlsplit(source)
    match = _HUB_STYLE_DIGEST.search(url.path) if url.netloc in _HUB_STYLE_HOSTS else None
    return File(source, sha256=match.group(1) if match else None,
                folder=hashlib.sha256(source.encode()).hexdigest()[:12])


def looks_like_a_name(text: str) -> bool:
    """True for a bare word (no path separator, no scheme, no file extension)."""
    return bool(text) and "/" not in text and "\\" not in text and "." not in text


# --------------------------------------------------------------------------- TiTok (bytedance)
# Hugging Face repos of the official README (PyTorchModelHubMixin: model.safetensors +
# config.json, the same tensors as fun-research/TiTok's .bin files). Sizes are read from the
# tensor shapes (checked in tests/test_released_checkpoints.py against the key lists recorded
# there: every variant but titok_bl128_vae, whose list is not recorded).

_TITOK = {  # name: (hub repo suffix, paper rFID, expected model arguments)
    "titok_l32": ("l32", 2.21, dict(num_latent_tokens=32, encoder_width=1024, quantizer="vq")),
    "titok_b64": ("b64", 1.70, dict(num_latent_tokens=64, encoder_width=768, quantizer="vq")),
    "titok_s128": ("s128", 1.71, dict(num_latent_tokens=128, encoder_width=512, quantizer="vq")),
    "titok_bl64_vq8k": ("bl64_vq8k", 2.06, dict(num_latent_tokens=64, codebook_size=8192)),
    "titok_bl128_vq8k": ("bl128_vq8k", 1.49, dict(num_latent_tokens=128, codebook_size=8192)),
    "titok_sl256_vq8k": ("sl256_vq8k", 1.03, dict(num_latent_tokens=256, codebook_size=8192)),
    "titok_ll32_vae": ("ll32_vae_c16", 1.61, dict(num_latent_tokens=32, quantizer="vae")),
    "titok_bl64_vae": ("bl64_vae_c16", 1.25, dict(num_latent_tokens=64, quantizer="vae")),
    "titok_bl128_vae": ("bl128_vae_c16", 0.84, dict(num_latent_tokens=128, quantizer="vae")),
}
for _name, (_repo, _rfid, _expect) in _TITOK.items():
    _add(Released(_name, "titok",
                  {"checkpoint": File(f"hf://yucornetto/tokenizer_titok_{_repo}_imagenet/"
                                      "model.safetensors")},
                  expect=_expect, paper=f"rFID {_rfid} (ImageNet 256, README_TiTok)",
                  description=f"TiTok tokenizer {_repo}"))

_MASKGIT = {  # name: (hub repo suffix, gFID, tokens)
    "maskgit_titok_l32": ("l32", 2.77, 32), "maskgit_titok_b64": ("b64", 2.48, 64),
    "maskgit_titok_s128": ("s128", 1.97, 128)}
for _name, (_repo, _gfid, _tokens) in _MASKGIT.items():
    _add(Released(_name, "maskgit",
                  {"checkpoint": File(f"hf://yucornetto/generator_titok_{_repo}_imagenet/"
                                      "model.safetensors")},
                  expect=dict(num_tokens=_tokens),
                  paper=f"gFID {_gfid} (ImageNet 256, with titok_{_repo}; README_TiTok)",
                  description=f"MaskGIT generator on the TiTok-{_repo} tokens",
                  tokenizer=f"titok_{_repo}"))

_add(Released("maskgit_vqgan", "maskgit_vqgan",
              {"checkpoint": File("hf://fun-research/TiTok/maskgit-vqgan-imagenet-f16-256.bin")},
              paper="rFID 2.28 (ImageNet 256, TiTok paper table)",
              description="MaskGIT-VQGAN (open-muse port): TiTok's proxy-code teacher and RAR's "
                          "tokenizer"))

_RAR = {"rar_b": ("B", 1.95), "rar_l": ("L", 1.70), "rar_xl": ("XL", 1.50),
        "rar_xxl": ("XXL", 1.48)}
for _name, (_size, _gfid) in _RAR.items():
    _add(Released(_name, "rar", {"checkpoint": File(f"hf://yucornetto/RAR/{_name}.bin")},
                  options=dict(size=_size),
                  paper=f"gFID {_gfid} (ImageNet 256, with maskgit_vqgan; README_RAR)",
                  description=f"RAR-{_size} generator on MaskGIT-VQGAN codes",
                  tokenizer="maskgit_vqgan"))

# --------------------------------------------------------------------------- GigaTok (Google Drive)
# The official README links Google Drive files only: download them by hand (the error names the
# page and the path to put the file at), or convert the local file with `tok1d convert KIND
# --checkpoint=FILE --out=DIR`.

_DRIVE = "https://drive.google.com/file/d/{}/view"
_GIGATOK = {  # name: (preset, file, drive id, rFID)
    "gigatok_s_s": ("s_s", "VQ_SS256_e100.pt", "1Q_WHCT6mdNnu0GkHCm0CbXaP6kFeTe5h", 1.01),
    "gigatok_s_b": ("s_b", "VQ_SB256_e200.pt", "17K-h2Jwep53RUEf6CEOV3ro7Cz_DaIWC", 0.89),
    "gigatok_b_l": ("b_l", "VQ_BL256_e200.pt", "1VnBu4aj0N7lFa1_wKBdTgLNZmaNgFvwi", 0.81),
    "gigatok_b_l_dino_disc": ("b_l", "VQ_BL256_dino_disc.pt",
                              "11bXyg6y15hIWYnIsl7YbwDtRAJMK7jjn", 0.51),
    "gigatok_xl_xxl": ("xl_xxl", "VQ_XLXXL256_e300.pt", "1HK_bV_zklLfGmIHGE4gMwjfhLLKi6Z3G", 0.79),
}


def _from_drive(name: str, kind: str, filename: str, drive_id: str, options: dict[str, Any],
                paper: str, description: str, tokenizer: str = "") -> None:
    _add(Released(name, kind, {"checkpoint": File(_DRIVE.format(drive_id), manual=True,
                                                  filename=filename)},
                  options=options, paper=paper, description=f"{description} (manual download)",
                  tokenizer=tokenizer))


for _name, (_preset, _file, _id, _rfid) in _GIGATOK.items():
    _from_drive(_name, "gigatok", _file, _id, dict(preset=_preset),
                f"rFID {_rfid} (ImageNet 256, GigaTok README)", f"GigaTok tokenizer {_preset}")

_GPT = {  # name: (size, file, drive id, gFID)
    "gpt_b_gigatok_s_s": ("B", "GPT_B256_e300_VQ_SS.pt", "1VTaBPP-UUE6wc148vQQejfYNVjyYm4IS", 4.05),
    "gpt_b_gigatok_s_b": ("B", "GPT_B256_e300_VQ_SB.pt", "1aeMpU5ybvs0s5wsuhBoTZDhYYc4WHZh7", 3.83),
    "gpt_b_gigatok_b_l": ("B", "GPT_B256_e300_VQ_BL.pt", "1ZiRAk9pHhcrrbVMP1qSf4rDfSJMCsY6Y", 3.26),
    "gpt_b_gigatok_b_l_dino_disc": ("B", "GPT_B256_e300_VQ_BL_dino_disc.pt",
                                    "1BckVcQ7NPipa8tjAazwBy0usJnO8pdHp", 3.33),
    "gpt_b_gigatok_xl_xxl": ("B", "GPT_B256_e300_VQ_XLXXL.pt",
                             "1zIIy6TVo8WIHiGKFp83CfyFaUytFQ1uR", 3.15),
    "gpt_xl_gigatok_b_l": ("XL", "GPT_XL256_e300_VQ_BL.pt", "1ABRaQ8h-mv-JE6gHlAnTPUJTlbd25yQt",
                           2.13),
    "gpt_xxl_gigatok_b_l": ("XXL", "GPT_XXL256_e300_VQ_BL.pt",
                            "1qC1wkF99IV2cptGR_ALuqqXz0oKBiKp9", 2.03),
    "gpt_xxl_gigatok_xl_xxl": ("XXL", "GPT_XXL256_e300_VQ_XLXXL.pt",
                               "1yMPOYx3oR1PZpZynEotQAO720UVxL0iL", 1.98),
}
for _name, (_size, _file, _id, _gfid) in _GPT.items():
    _tok = _name.split("_gigatok_")[1]
    _from_drive(_name, "gpt", _file, _id, dict(size=_size, weights="model"),
                f"gFID {_gfid} (ImageNet 256, with gigatok_{_tok}; GigaTok README)",
                f"GPT-{_size} on the GigaTok {_tok} tokens", tokenizer=f"gigatok_{_tok}")

# --------------------------------------------------------------------------- frozen networks

_add(Released("dinov2_vitb14", "dinov2", {"checkpoint": File(
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth")},
    expect=dict(embed_dim=768, depth=12, num_heads=12, patch_size=14),
    paper="DINOv2 ViT-B/14 (LVD-142M), no registers",
    description="GigaTok's semantic-regularisation teacher (its position table is resampled to "
                "the student's grid when used as the teacher)"))
_add(Released("dino_vits16", None, {"checkpoint": File(
    "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
    "dino_deitsmall16_pretrain.pth")},
    paper="DINO ViT-S/16",
    description="the DINO discriminator's frozen trunk (a file: load_disc_trunk converts it)"))
_add(Released("lpips_vgg", "lpips", {
    "vgg": File("https://download.pytorch.org/models/vgg16-397923af.pth", sha256="397923af"),
    "checkpoint": File("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/"
                       "weights/v0.1/vgg.pth", package=("lpips", "weights/v0.1/vgg.pth"))},
    paper="LPIPS v0.1 (VGG16 trunk + linear layers)",
    description="perceptual loss and LPIPS metric (the linear layers from the installed "
                "`lpips` package when there is one)"))
_add(Released("convnext_s", "convnext_s", {"checkpoint": File(
    "https://download.pytorch.org/models/convnext_small-0c510722.pth", sha256="0c510722")},
    paper="torchvision convnext_small IMAGENET1K_V1",
    description="ConvNeXt-S perceptual loss"))
_add(Released("inception_fid", "inception_fid", {"checkpoint": File(
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth", sha256="6726825d")},
    paper="pytorch-fid's port of the TF 2015 FID Inception",
    description="FID / IS Inception"))
