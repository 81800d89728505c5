"""`create_model`: a pretrained backbone (torchvision or timm) with a new classification head."""

from __future__ import annotations

import difflib
import urllib.error
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from imgtune.core.errors import ConfigError, WeightsError
from imgtune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from imgtune.models.weights import LoadReport, load_matching, read_state_dict


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the architecture (the weights live elsewhere)."""

    backbone: str
    num_classes: int
    head: str = "mlp"
    head_hidden: int = 128
    dropout: float = 0.0
    freeze: str = "backbone"
    source: str = "torchvision"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageClassifier(nn.Module):
    """`head(backbone(x))`, where `backbone` maps images to pooled feature vectors.

    Frozen parts stay in eval mode while training, so their batch-norm statistics do not drift.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, spec: ModelSpec, num_features: int, norm: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.num_features = num_features
        self.norm = norm  # mean, std, interpolation, crop ratio of the backbone's pretraining
        self.frozen_modules: list[nn.Module] = []
        self.weights_report: LoadReport | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    @property
    def backbone_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.backbone.parameters())

    def preprocessing(self, image_size: int) -> Preprocessing:
        return Preprocessing(
            image_size=image_size,
            resize_size=round(image_size / self.norm.get("crop_ratio", 0.875)),
            mean=tuple(self.norm["mean"]),
            std=tuple(self.norm["std"]),
            interpolation=self.norm.get("interpolation", "bilinear"),
        )


def make_head(
    kind: str,
    num_features: int,
    num_classes: int,
    hidden: int = 128,
    dropout: float = 0.0,
    *,
    seed: int | None = None,
) -> nn.Module:
    """The original's Linear(features,hidden)-ReLU-Linear(hidden,N) ('mlp') or a single Linear ('linear').

    With `seed`, the head's initial weights depend on the seed alone (not on what drew random numbers before,
    such as building the backbone), so a head trained with others (imgtune.training.batched_heads) starts
    exactly as it would alone."""
    if seed is None:
        return _head_layers(kind, num_features, num_classes, hidden, dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _head_layers(kind, num_features, num_classes, hidden, dropout)


def _head_layers(kind: str, num_features: int, num_classes: int, hidden: int, dropout: float) -> nn.Module:
    layers: list[nn.Module] = []
    if kind == "mlp":
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(num_features, hidden), nn.ReLU(inplace=True)]
        num_features = hidden
    elif kind != "linear":
        raise ConfigError(f"unknown head {kind!r}", "use 'mlp' or 'linear'")
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(num_features, num_classes))
    return nn.Sequential(*layers)


def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _source_of(name: str) -> str:
    if name in torchvision_models():
        return "torchvision"
    import timm

    if timm.is_model(name):
        return "timm"
    close = difflib.get_close_matches(name, sorted(set(torchvision_models() + timm.list_models())), n=3)
    raise ConfigError(
        f"unknown backbone {name!r}",
        f"did you mean {', '.join(close)}?" if close else "use a torchvision or timm classification model name",
    )


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"{type(model).__name__} has no Linear classifier to replace", "choose another backbone")
    return found[-1]


def _replace(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _offline_error(backbone: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"cannot download the pretrained weights of {backbone} ({type(exc).__name__}: {str(exc)[:160]})",
        "pass a local state dict with --weights PATH, train from scratch with --pretrained none, "
        "or put the file in the torch hub cache ($TORCH_HOME/hub/checkpoints)",
    )


def _torchvision_backbone(
    name: str, pretrained: str, weights: str | None
) -> tuple[nn.Module, int, dict, LoadReport | None]:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    norm: dict[str, Any] = {
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "crop_ratio": 0.875,
    }
    classifier_name, classifier = _last_linear(model)
    report = None
    if weights:
        report = load_matching(model, read_state_dict(weights), str(weights), ignore_prefixes=(classifier_name + ".",))
    elif pretrained == "default":
        tv_weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            state = tv_weights.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise _offline_error(name, exc) from None
        report = load_matching(model, state, f"torchvision {tv_weights}", ignore_prefixes=(classifier_name + ".",))
        preset = tv_weights.transforms()
        norm = {
            "mean": tuple(preset.mean),
            "std": tuple(preset.std),
            "interpolation": preset.interpolation.value,
            "crop_ratio": preset.crop_size[0] / preset.resize_size[0],
        }
    _replace(model, classifier_name, nn.Identity())
    if "." in classifier_name:  # e.g. ConvNeXt's classifier = (LayerNorm2d, Flatten, Linear): keep out of stages
        # Stored outside nn.Module's registry, so it does not appear twice in the state dict.
        object.__setattr__(
            model, "_imgtune_classifier_container", model.get_submodule(classifier_name.rsplit(".", 1)[0])
        )
    return model, classifier.in_features, norm, report


def _timm_backbone(name: str, pretrained: str, weights: str | None) -> tuple[nn.Module, int, dict, LoadReport | None]:
    import timm

    report = None
    try:
        model = timm.create_model(name, pretrained=pretrained == "default" and not weights, num_classes=0)
    except (OSError, RuntimeError) as exc:  # huggingface_hub raises OSError subclasses offline
        raise _offline_error(name, exc) from None
    if weights:
        report = load_matching(model, read_state_dict(weights), str(weights))
    cfg = timm.data.resolve_data_config(model=model)
    norm = {
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_ratio": cfg.get("crop_pct", 0.875),
    }
    # Some timm models (MobileNetV3/V4) have a pre-logits layer wider than `num_features`.
    return model, getattr(model, "head_hidden_size", None) or model.num_features, norm, report


def _with_params(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.children() if any(True for _ in m.parameters())]


def last_stage(backbone: nn.Module) -> nn.Module:
    """The backbone's last stage: ResNet's layer4, MobileNet's last feature block, ConvNeXt's last stage.

    timm models name it in `feature_info`. Otherwise it is the last child holding parameters (leaving out
    what remains of the replaced classifier), descending through a single trunk container (`features`)
    when the top level has too few children to be a list of stages.
    """
    feature_info = getattr(backbone, "feature_info", None)
    if isinstance(feature_info, list) and feature_info and "module" in feature_info[-1]:
        return backbone.get_submodule(feature_info[-1]["module"])
    remnant = getattr(backbone, "_imgtune_classifier_container", None)
    module = backbone
    while True:
        children = [m for m in _with_params(module) if m is not remnant]
        if not children:
            return module
        if len(children) >= 3 or not isinstance(children[-1], nn.Sequential | nn.ModuleList):
            return children[-1]
        module = children[-1]


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's stages from input to output (ResNet's stem parts and layer1-4, MobileNet's feature blocks,
    ...), found as `last_stage` finds the last one: the children holding parameters, descending through a single
    trunk container. For layer-wise learning rates; parameters outside them count as the first stage's."""
    remnant = getattr(backbone, "_imgtune_classifier_container", None)
    module = backbone
    while True:
        children = [m for m in _with_params(module) if m is not remnant]
        if not children:
            return [module]
        if len(children) >= 3 or not isinstance(children[-1], nn.Sequential | nn.ModuleList):
            return children
        module = children[-1]


def create_model(
    backbone: str = "resnet50",
    num_classes: int = 2,
    head: str = "mlp",
    freeze: str = "backbone",
    *,
    pretrained: str = "default",
    weights: str | None = None,
    head_hidden: int = 128,
    dropout: float = 0.0,
    head_seed: int | None = None,
) -> ImageClassifier:
    """A backbone with a new head for `num_classes`.

    Args:
        backbone: a torchvision classification model name (resnet50, mobilenet_v2, ...) or a timm model name.
        num_classes: classes of the new head.
        head: 'mlp' (the original's Linear-ReLU-Linear) or 'linear'.
        freeze: 'backbone' (all of it), 'all_but_last' (all but the last stage) or 'none'.
        pretrained: 'default' for the library's ImageNet weights (downloaded once), 'none' for random init.
        weights: a local state dict for the backbone instead of the library's download.
        head_hidden: hidden width of the mlp head.
        dropout: dropout before the head's Linear layers.
        head_seed: initialise the head from this seed alone (see make_head).

    Raises:
        ConfigError: unknown backbone, head or freeze mode.
        WeightsError: weights that cannot be downloaded, read or matched.
    """
    if freeze not in ("backbone", "all_but_last", "none"):
        raise ConfigError(f"unknown freeze mode {freeze!r}", "use backbone, all_but_last or none")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    source = _source_of(backbone)
    build = _torchvision_backbone if source == "torchvision" else _timm_backbone
    trunk, num_features, norm, report = build(backbone, pretrained, weights)
    spec = ModelSpec(backbone, num_classes, head, head_hidden, dropout, freeze, source)
    model = ImageClassifier(
        trunk,
        make_head(head, num_features, num_classes, head_hidden, dropout, seed=head_seed),
        spec,
        num_features,
        norm,
    )
    model.weights_report = report
    if freeze != "none":
        trunk.requires_grad_(False)
        model.frozen_modules = [trunk]
        if freeze == "all_but_last":
            stage = last_stage(trunk)
            stage.requires_grad_(True)
            # Everything after the last stage (e.g. ConvNeXt's final norm) trains with it.
            names = [n for n, _ in trunk.named_children()]
            stage_top = next(n for n, m in trunk.named_children() if m is stage or any(x is stage for x in m.modules()))
            for name in names[names.index(stage_top) + 1 :]:
                getattr(trunk, name).requires_grad_(True)
            model.frozen_modules = [m for m in trunk.modules() if _is_frozen_leaf(m)]
    return model


def _is_frozen_leaf(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)
