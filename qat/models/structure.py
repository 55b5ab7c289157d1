"""Where a causal LM keeps its decoder blocks and their projections, found from its structure.

Hugging Face models name these differently (`model.layers`, `transformer.h`, `gpt_neox.layers`,
`model.decoder.layers`) and GPT-2-style models use `Conv1D` (a Linear with its weight stored
transposed, (in, out)) for their projections. Everything that walks blocks or swaps projections asks
here instead of matching attribute names.
"""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2, GPT-J's relatives): y = x @ W + b with W of shape (in, out).

    Matched by its duck type so this module does not import transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_projection(module: nn.Module) -> bool:
    """A Linear-like layer the quantizer may take: nn.Linear (and subclasses) or a Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _projection_like(module: nn.Module) -> bool:
    """A projection, or a served one (qat.kernels.QuantizedLinear and the like)."""
    return is_projection(module) or (hasattr(module, "in_features")
                                     and hasattr(module, "out_features"))


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


TRANSPOSED = "stored_transposed"  # attribute set on a Linear made from a Conv1D


def as_linear(module: nn.Module) -> nn.Linear:
    """The projection as an nn.Linear computing the same function: a Conv1D's weight is transposed
    once into a new Parameter (its optimizer state, if any, does not carry over) and the Linear is
    marked `stored_transposed`, so a float export writes it back in the Conv1D's layout; an
    nn.Linear is returned as it is."""
    if not is_conv1d(module):
        return module
    in_f, out_f = features(module)
    with torch.device("meta"):
        linear = nn.Linear(in_f, out_f, bias=module.bias is not None, dtype=module.weight.dtype)
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(),
                                 requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    setattr(linear, TRANSPOSED, True)
    linear.source_class = type(module).__name__
    return linear


def source_class(module: nn.Module) -> str:
    """The class name the model's own code gives this layer (before any swap)."""
    return getattr(module, "source_class", type(module).__name__)


def stored_transposed(module: nn.Module) -> bool:
    """Whether the model's checkpoint layout for this Linear is (in, out) (it was a Conv1D)."""
    return bool(getattr(module, TRANSPOSED, False))


def linearize(model: nn.Module, names=None) -> list[str]:
    """Replace the Conv1D modules among `names` (None: all of them) by the Linear they are, in
    place; returns their names. Done once, before pruning, so it sees ordinary (out, in) weights."""
    if names is None:
        names = [n for n, m in model.named_modules() if is_conv1d(m)]
    done = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if is_conv1d(module):
            setattr(parent, child, as_linear(module))
            done.append(name)
    return done


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, ModuleList) of the decoder blocks, e.g. ("model.layers", ...).

    The blocks are the ModuleList holding the most parameters among those whose every entry
    contains a projection: that is the decoder stack in every causal LM transformers ships (expert
    lists of MoE layers sit inside a block, so they hold less)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(_projection_like(m) for m in entry.modules()) for entry in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[2]:
            best = (name, module, size)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found (a ModuleList of blocks "
                         "with Linear projections inside); block-wise methods need one")
    return best[0], best[1]


def block_patterns(model: nn.Module) -> tuple[str, ...]:
    """Module-name patterns selecting every projection inside the decoder blocks."""
    return (f"{decoder_blocks(model)[0]}.*",)


@torch.no_grad()
def check_causal(model: nn.Module, where: str) -> None:
    """Refuse a model that is not a causal decoder: each position's logits must depend on its
    prefix alone, so changing the last token of a short input must leave every earlier
    position's logits as they were (an encoder loaded as a causal LM attends both ways and fails
    this; an encoder-decoder has no such forward at all)."""
    kind = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{where}: {kind} is an encoder-decoder, not a causal decoder")
    vocab = model.config.vocab_size
    a = torch.tensor([[3, 5, 7, 11, 13, 17, 19, 23]]) % vocab
    b = a.clone()
    b[0, -1] = (b[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        first, second = (model(input_ids=x.to(device), use_cache=False).logits[0, :-1].float()
                         for x in (a, b))
    except Exception as err:  # noqa: BLE001 - whatever the forward raises, it is no causal LM
        raise ValueError(f"{where}: {kind} does not run as a causal LM "
                         f"({type(err).__name__}: {err})") from err
    finally:
        model.train(was_training)
    change = ((first - second).abs().max() / first.abs().max().clamp_min(1e-6)).item()
    if not change < 1e-3:
        raise ValueError(f"{where}: {kind} is not a causal decoder: changing the last input token "
                         f"changed the logits before it (by {change:.2g} of their range); its "
                         "attention sees later tokens")
