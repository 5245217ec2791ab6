"""Layer lookup by dotted name and forward hooks that are always removed (``finally``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from xaudit.utils.errors import ConfigError, unknown_choice


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every sub-module (what ``target_layer`` accepts)."""
    return [name for name, _ in model.named_modules() if name]


def _backbone_prefix(model: nn.Module) -> str | None:
    """Dotted path of the sub-module that carries ``default_target_layer`` ("" for the model itself)."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "default_target_layer", None), str):
            return name
    return None


def default_target_layer(model: nn.Module) -> str:
    """The backbone's ``default_target_layer``, prefixed for wrappers (``net.layer4`` in a Classifier)."""
    prefix = _backbone_prefix(model)
    if prefix is None:
        raise ConfigError(
            f"{type(model).__name__} has no default_target_layer; pass target_layer=<dotted module name>, "
            "e.g. the last conv block (choices are listed by xaudit.explainers.hooks.layer_names(model)).")
    layer = model.get_submodule(prefix).default_target_layer
    return f"{prefix}.{layer}" if prefix else layer


def resolve_layer(model: nn.Module, name: str | None, key: str = "explainer.target_layer",
                  choices: Callable[[], Iterable[str]] | None = None) -> str:
    """Full dotted name of ``name`` in ``model`` (default: the backbone's target layer).

    A name relative to the backbone also works on a wrapper (``layer4`` on a Lightning
    ``Classifier`` whose backbone is ``net``), so configs need not know the wrapping. An unknown
    name is refused naming the config ``key`` it came from and listing ``choices()`` (called only
    then; default: every layer).
    """
    if name is None:
        name = default_target_layer(model)
    if not isinstance(name, str):
        raise ConfigError(f"target_layer must be a dotted module name (str); got {type(name).__name__}.")
    valid = layer_names(model)
    if name in valid:
        return name
    prefix = _backbone_prefix(model)
    if prefix and f"{prefix}.{name}" in valid:
        return f"{prefix}.{name}"
    raise unknown_choice(key.rsplit(".", 1)[-1], name, valid if choices is None else choices(), key=key)


class Recorder:
    """What a forward hook saw: the layer output of the last call."""

    def __init__(self) -> None:
        self.output: Tensor | None = None
        self.calls = 0


@contextmanager
def record_output(layer: nn.Module, *, track_grad: bool = False) -> Iterator[Recorder]:
    """Record ``layer``'s output during the ``with`` block; the hook is removed in ``finally``.

    With ``track_grad`` the recorded tensor is something ``torch.autograd.grad`` can differentiate
    with respect to (a fresh leaf when nothing upstream requires grad). The model always continues
    with a clone, so an in-place op after the layer (``out += identity``, an inplace ReLU) cannot
    change the recorded activation.
    """
    rec = Recorder()

    def hook(module: nn.Module, inputs: object, output: object) -> Tensor | None:
        if not isinstance(output, Tensor):
            raise ConfigError(f"target layer {type(module).__name__} returns {type(output).__name__}, not a tensor; "
                              "pick a layer whose output is a [B,K,h,w] feature map "
                              "(or a transformer block's [B,T,C] tokens / [B,H,W,C] Swin grid).")
        rec.calls += 1
        out = output if output.requires_grad or not track_grad else output.detach().requires_grad_(True)
        rec.output = out
        return out.clone()

    handle = layer.register_forward_hook(hook)
    try:
        yield rec
    finally:
        handle.remove()
