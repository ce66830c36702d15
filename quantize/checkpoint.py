"""Source checkpoints: find, validate and fingerprint a bf16 Hugging Face checkpoint.

Only safetensors weights are accepted: a pickle-only checkpoint (``.bin``,
``.pt``) is refused, never unpickled.  The fingerprint is a sha256 over the
files that define the model (weights, config, tokenizer); per-file hashes are
cached by (size, mtime, inode) so a re-run does not re-read gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from edgequant.core.atomic import atomic_write_text
from edgequant.core.errors import BadInput
from edgequant.core.hashing import file_sha256

# Architectures llama.cpp's converter turns into a runnable GGUF text model and
# that edgequant is tested with.  For Gemma3ForConditionalGeneration (MedGemma)
# the converter writes the language model; the vision tower is not a rung.
SUPPORTED_ARCHITECTURES = frozenset({
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
    "Gemma2ForCausalLM",
    "GemmaForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
})

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer\.model|tokenizer_config\.json"
    r"|special_tokens_map\.json|chat_template\.jinja|chat_template\.json|.*\.safetensors"
    r"|model\.safetensors\.index\.json)$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_id: str
    architecture: str
    files: tuple[str, ...]
    weight_bytes: int
    config: dict

    @property
    def n_params_estimate(self) -> int:
        """Parameters of the language model, the part the ladder quantizes, from the safetensors
        headers (exact, no weights read).  A multimodal checkpoint's vision tower and projector are
        left out: see ``n_params_outside_ladder``."""
        return _count_params(self.path, self._weight_files())[0]

    @property
    def n_params_outside_ladder(self) -> int:
        """Parameters no rung carries: a multimodal checkpoint's vision tower and projector (MedGemma's
        SigLIP encoder); 0 for a text model."""
        return _count_params(self.path, self._weight_files())[1]

    def _weight_files(self) -> list[str]:
        return [f for f in self.files if f.endswith(".safetensors")]


# Tensor name prefixes of the parts of a multimodal checkpoint that the converter does not put in the
# text model's GGUF (the hub layout and transformers 5's own).
_OUTSIDE_LADDER = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


def _count_params(root: Path, weight_files: list[str]) -> tuple[int, int]:
    """(language-model parameters, parameters outside the ladder) from the safetensors headers."""
    total = 0
    outside = 0
    for name in weight_files:
        corrupt = BadInput(f"checkpoint {root}: {name} has a corrupt or cut-short safetensors header; "
                           f"copy or download that file again")
        try:
            with open(root / name, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 * 1024 * 1024:
                    raise corrupt
                raw = fh.read(n)
            if len(raw) != n:
                raise corrupt
            header = json.loads(raw)
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                count = 1
                for d in meta["shape"]:
                    count *= int(d)
                if key.startswith(_OUTSIDE_LADDER):
                    outside += count
                else:
                    total += count
        except (struct.error, ValueError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            raise corrupt from None
    return total, outside


def open_checkpoint(path: str | os.PathLike, model_id: str | None = None) -> Checkpoint:
    """Validate a local checkpoint folder; every failure is one BadInput line."""
    root = Path(path)
    if not root.exists():
        raise BadInput(f"model {root}: no such file or folder; pass a Hugging Face checkpoint folder "
                       f"or a hub id such as google/gemma-3-270m")
    if not root.is_dir():
        raise BadInput(f"model {root}: not a checkpoint folder (a Hugging Face checkpoint is a folder "
                       f"with config.json, tokenizer and *.safetensors)")
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    if "config.json" not in names:
        raise BadInput(f"model {root}: no config.json, so this is not a Hugging Face checkpoint")
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"model {root}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise BadInput(f"model {root}: config.json holds a JSON {type(config).__name__}, not an object "
                       f"({{\"architectures\": [...], ...}}); restore the checkpoint's own config.json")
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise BadInput(f"model {root}: config.json names no architectures")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadInput(f"model {root}: architecture {arch} is not supported; supported: "
                       f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if not safetensors:
        if pickles:
            raise BadInput(f"model {root}: only pickle weights ({pickles[0]}); edgequant loads safetensors "
                           f"only and never unpickles a checkpoint; convert it to safetensors first")
        raise BadInput(f"model {root}: no *.safetensors weights found")
    if not any(t in names for t in TOKENIZER_FILES):
        raise BadInput(f"model {root}: no tokenizer (tokenizer.json or tokenizer.model); copy the "
                       f"tokenizer files of the base model into the folder")
    _check_shard_index(root, names)
    files = tuple(n for n in names if _MODEL_FILES.match(n))
    weight_bytes = sum((root / n).stat().st_size for n in safetensors)
    return Checkpoint(path=root.resolve(), model_id=model_id or root.resolve().name, architecture=arch,
                      files=files, weight_bytes=weight_bytes, config=config)


def _check_shard_index(root: Path, names: list[str]) -> None:
    """A sharded checkpoint's index must name only shards that are there (an interrupted download
    leaves the index and some shards): one line naming the first missing shard."""
    index_name = "model.safetensors.index.json"
    if index_name not in names:
        return
    try:
        index = json.loads((root / index_name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadInput(f"model {root}: {index_name} is not valid JSON ({exc}); download the checkpoint "
                       f"again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadInput(f"model {root}: {index_name} has no weight_map of tensor names to shard files; "
                       f"download the checkpoint again")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if s not in names]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BadInput(f"model {root}: shard {missing[0]}{more} named in {index_name} is missing "
                       f"({len(shards) - len(missing)} of {len(shards)} shards present); the download is "
                       f"incomplete: download the checkpoint again")


def checkpoint_hash(ckpt: Checkpoint, cache_file: Path) -> str:
    """sha256 over (name, sha256) of every model-defining file, with a stat-keyed cache."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    changed = False
    h = hashlib.sha256()
    for name in ckpt.files:
        p = ckpt.path / name
        st = p.stat()
        key = f"{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = cache.get(key)
        if digest is None:
            digest = file_sha256(p)
            cache[key] = digest
            changed = True
        h.update(f"{name}\0{digest}\n".encode())
    if changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=0, sort_keys=True))
    return h.hexdigest()


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def download_from_hub(repo_id: str, cache_root: Path) -> Path:
    """Download a checkpoint the user named; safetensors, config and tokenizer only."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # pragma: no cover - transformers depends on it
        raise BadInput("downloading from the hub needs huggingface_hub; pip install huggingface_hub") from None
    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(cache_root / "hub"),
            allow_patterns=["*.safetensors", "*.json", "tokenizer.model", "*.jinja"],
        )
    except HfHubHTTPError as exc:
        raise BadInput(f"model {repo_id}: hub download failed ({str(exc).splitlines()[0]}); "
                       f"check the id, your network and HF_TOKEN for gated models") from None
    except OSError as exc:
        raise BadInput(f"model {repo_id}: hub download failed ({exc}); check the id and your network") from None
    return Path(path)
