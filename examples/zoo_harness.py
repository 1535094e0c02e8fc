"""Which models tokenprune sparsifies: one check per model, and the zoo of families it is checked on.

A test harness, not part of the package: `examples/zoo_coverage.py` runs it over `ZOO` and writes docs/zoo.md;
tests/test_zoo.py loads this file and runs a subset.

`check_model` builds a model with random weights (all-zero weights filled), sparsifies it at rho = 0.7 and checks,
*independently of the self-check inside `sparsify`*: eval runs; masked and pruned execution agree for the same
decisions; keep-all equals the original — both with the model's own weights and with its layer scales set to 1
(found here by name, not by the self-check's graph rule: at timm's 1e-5/1e-6 init a wrong block hides behind its
scale); every predictor gets a gradient in training; the eval model costs fewer multiply-adds (fvcore) than the
dense one.
"""

from __future__ import annotations

import re
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tokenprune.errors import TokenPruneError

__all__ = ["ZooEntry", "ZOO", "Coverage", "check_model", "build_with_timm"]


@dataclass(frozen=True)
class ZooEntry:
    """One model per family: library, name, constructor keywords that keep it small, and its family."""

    family: str
    name: str
    library: str = "timm"
    kwargs: tuple = ()


def _e(family: str, name: str, library: str = "timm", **kwargs) -> ZooEntry:
    return ZooEntry(family, name, library, tuple(sorted(kwargs.items())))


#: One small model per family: every ViT-style and hierarchical family timm ships, common CNNs, torchvision.
ZOO: list[ZooEntry] = [
    # plain and modern ViTs
    _e("vit", "vit_tiny_patch16_224"),
    _e("deit", "deit_tiny_patch16_224"),
    _e("deit (distilled)", "deit_tiny_distilled_patch16_224"),
    _e("deit3", "deit3_small_patch16_224"),
    _e("flexivit", "flexivit_small"),
    _e("vit (registers, dinov2)", "vit_small_patch14_reg4_dinov2", img_size=112),
    _e("clip vit", "vit_base_patch32_clip_224"),
    _e("siglip (map head)", "vit_base_patch16_siglip_224", img_size=112),
    _e("vit (gap)", "vit_medium_patch16_gap_256", img_size=128),
    _e("vit (parallel blocks)", "vit_pwee_patch16_reg1_gap_256", img_size=128),
    _e("vit relpos", "vit_relpos_small_patch16_224"),
    _e("vit rope", "vit_small_patch16_rope_224"),
    _e("eva02", "eva02_tiny_patch14_224"),
    _e("beit", "beit_base_patch16_224", img_size=112),
    _e("beitv2", "beitv2_base_patch16_224", img_size=112),
    _e("cait", "cait_xxs24_224"),
    _e("crossvit", "crossvit_tiny_240"),
    _e("xcit", "xcit_nano_12_p16_224"),
    _e("convit", "convit_tiny"),
    _e("volo", "volo_d1_224"),
    _e("tnt", "tnt_s_patch16_224"),
    _e("pit", "pit_ti_224"),
    _e("levit", "levit_128s"),
    _e("vitamin", "vitamin_small_224"),
    _e("naflexvit", "naflexvit_base_patch16_gap", img_size=128),
    _e("samvit", "samvit_base_patch16_224"),
    _e("qwen3 vit", "qwen3_vit_88m", img_size=112),
    _e("deepseek vit", "deepseek_vit_412m", img_size=112),
    _e("gemma4 vit", "gemma4_vit_167m", img_size=112),
    _e("vit hybrid", "vit_small_r26_s32_224"),
    _e("mlp-mixer", "mixer_s32_224"),
    _e("resmlp", "resmlp_12_224"),
    _e("gmlp", "gmlp_ti16_224"),
    _e("convmixer", "convmixer_768_32"),
    # hierarchical
    _e("swin", "swin_tiny_patch4_window7_224"),
    _e("swinv2", "swinv2_tiny_window8_256"),
    _e("swinv2 cr", "swinv2_cr_tiny_224"),
    _e("convnext", "convnext_atto"),
    _e("convnextv2", "convnextv2_atto"),
    _e("davit", "davit_tiny"),
    _e("focalnet", "focalnet_tiny_srf"),
    _e("gcvit", "gcvit_xxtiny"),
    _e("maxvit", "maxvit_tiny_tf_224"),
    _e("coatnet", "coatnet_0_224"),
    _e("caformer", "caformer_s18"),
    _e("convformer", "convformer_s18"),
    _e("poolformer", "poolformer_s12"),
    _e("poolformer v2", "poolformerv2_s12"),
    _e("edgenext", "edgenext_xx_small"),
    _e("efficientformer", "efficientformer_l1"),
    _e("efficientformerv2", "efficientformerv2_s0"),
    _e("fastvit", "fastvit_t8"),
    _e("nextvit", "nextvit_small"),
    _e("repvit", "repvit_m0_9"),
    _e("efficientvit (mit)", "efficientvit_b0"),
    _e("efficientvit (msra)", "efficientvit_m0"),
    _e("tiny_vit", "tiny_vit_5m_224"),
    _e("pvt v2", "pvt_v2_b0"),
    _e("twins", "twins_svt_small"),
    _e("coat", "coat_lite_tiny"),
    _e("nest", "nest_tiny"),
    _e("hiera", "hiera_tiny_224"),
    _e("sam2 hiera", "sam2_hiera_tiny"),
    _e("mvitv2", "mvitv2_tiny"),
    _e("inception_next", "inception_next_atto"),
    _e("mambaout", "mambaout_femto"),
    _e("starnet", "starnet_s050"),
    _e("rdnet", "rdnet_tiny"),
    _e("mobilevit", "mobilevit_xxs"),
    _e("sequencer", "sequencer2d_s"),
    _e("visformer", "visformer_tiny"),
    _e("shvit", "shvit_s1"),
    _e("swiftformer", "swiftformer_xs"),
    _e("csatv2", "csatv2"),
    _e("iformer", "iformer_t"),
    _e("lowformer", "lowformer_b0"),
    _e("efficientvim", "efficientvim_m1"),
    _e("fasternet", "fasternet_t0"),
    # CNNs
    _e("resnet", "resnet18"),
    _e("resnetv2", "resnetv2_50"),
    _e("regnet", "regnetx_002"),
    _e("efficientnet", "efficientnet_b0"),
    _e("mobilenetv3", "mobilenetv3_small_100"),
    _e("densenet", "densenet121"),
    _e("mobilenetv5", "mobilenetv5_300m", pretrained_cfg_overlay={"input_size": (3, 256, 256)}),  # not 768: minutes
    # torchvision
    _e("torchvision vit", "vit_b_16", "torchvision"),
    _e("torchvision swin", "swin_t", "torchvision"),
    _e("torchvision swin v2", "swin_v2_t", "torchvision"),
    _e("torchvision convnext", "convnext_tiny", "torchvision"),
    _e("torchvision maxvit", "maxvit_t", "torchvision"),
    _e("torchvision resnet", "resnet18", "torchvision"),
    _e("torchvision regnet", "regnet_y_400mf", "torchvision"),
    _e("torchvision efficientnet", "efficientnet_b0", "torchvision"),
    _e("torchvision mobilenet v3", "mobilenet_v3_small", "torchvision"),
]


@dataclass
class Coverage:
    """The outcome for one model and the figures behind it.

    Outcomes: "works", "refused", "wrong", "crash", "costlier", or "unavailable" (this timm cannot build it).
    """

    family: str
    name: str
    library: str
    outcome: str
    kind: str = ""
    macs_ratio: float | None = None
    masked_vs_pruned: float | None = None
    keep_all: float | None = None
    reason: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _build(entry: ZooEntry) -> nn.Module:
    from tokenprune.models import create_model

    return create_model(entry.name, library=entry.library, **dict(entry.kwargs))


def build_with_timm(entry: ZooEntry) -> nn.Module:
    """timm's own constructor, for keywords tokenprune's `create_model` refuses because a saved model could not
    record them (classes such as `block_fn=ParallelScalingBlock`): the checks do not need a saved model."""
    import timm

    return timm.create_model(entry.name, **dict(entry.kwargs))


def _randomize_zero_weights(model: nn.Module) -> None:
    """Give every all-zero parameter but a bias random values (std 0.02, timm's init): torchvision zero-initialises
    some classifiers, which would make logits (and every check) vacuous, and a zero weight can switch off what a
    check must see (ConvNeXt V2's GRN, an identity at init; a zero relative position bias table)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias") and p.numel() and not p.any():
                nn.init.normal_(p, std=0.02)


#: Layer scales by name (timm `LayerScale.gamma`, ConvNeXt `gamma`, CaiT/EVA `gamma_1/2`, MetaFormer `Scale.scale`,
#: torchvision `layer_scale`, tokenprune's `fast.gamma`): independent of the self-check's structural rule.
_LAYER_SCALE = re.compile(r"(^|\.)(gamma(_\d)?|layer_scale|scale)$")


@contextmanager
def unit_layer_scales(*models: nn.Module):
    """Set every per-channel layer scale of `models` to 1; restored bitwise afterwards."""
    params = {
        id(p): p
        for m in models
        for n, p in m.named_parameters()
        if _LAYER_SCALE.search(n) and sum(s > 1 for s in p.shape) <= 1
    }
    saved = [(p, p.detach().clone()) for p in params.values()]
    try:
        with torch.no_grad():
            for p in params.values():
                p.fill_(1.0)
        yield len(params)
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def _differences(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> tuple[float | None, float | None]:
    """(masked vs pruned, keep-all vs original) on `x`, relative to tolerance (None: shapes differ)."""
    from tokenprune import set_execution
    from tokenprune.fx.selfcheck import max_difference
    from tokenprune.nn.recorder import selectors

    with torch.no_grad():
        set_execution(sparse, "pruned")
        pruned = sparse(x)
        set_execution(sparse, "masked")
        masked = sparse(x)
        set_execution(sparse, "auto")
        original = dense(x)
        ratios = [s.keep_ratio for s in selectors(sparse)]
        for s in selectors(sparse):
            s.keep_ratio = 1.0
        keep_all = sparse(x)
        for s, r in zip(selectors(sparse), ratios):
            s.keep_ratio = r
    return max_difference(masked, pruned), max_difference(keep_all, original)


def _worst(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else max(values)


def check_model(entry: ZooEntry, *, flops: bool = True, seed: int = 0, build=None) -> Coverage:
    """Sparsify one model at rho = 0.7 and check it; never raises (a crash is an outcome). `build(entry)` makes the
    model (default: tokenprune's `create_model`)."""
    from tokenprune import config_of, profile, sparsify

    start = time.perf_counter()
    result = Coverage(entry.family, entry.name, entry.library, "crash")
    try:
        torch.manual_seed(seed)
        try:
            dense = (build or _build)(entry).eval()
        except TokenPruneError as e:
            result.outcome, result.reason = "unavailable", str(e).splitlines()[0]
            return result
        _randomize_zero_weights(dense)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                sparse = sparsify(dense, 0.7).eval()
            except TokenPruneError as e:
                result.outcome, result.reason = "refused", str(e).splitlines()[0]
                return result
        config = config_of(sparse)
        result.kind = config.kind
        x = torch.randn(2, *config.input_size)
        own = _differences(dense, sparse, x)
        with unit_layer_scales(dense, sparse):
            unit = _differences(dense, sparse, x)
        result.masked_vs_pruned = _worst(own[0], unit[0])
        result.keep_all = _worst(own[1], unit[1])
        if (
            result.masked_vs_pruned is None
            or result.masked_vs_pruned > 1
            or result.keep_all is None
            or (result.keep_all > 1)
        ):
            result.outcome, result.reason = "wrong", "masked != pruned or keep-all != original"
            return result
        sparse.train()
        out = sparse(x)
        loss = sum(t.float().square().mean() for t in (out if isinstance(out, (tuple, list)) else [out]))
        loss.backward()
        missing = [
            n
            for n, p in sparse.named_parameters()
            if "tokenprune_stage" in n and (p.grad is None or not p.grad.abs().sum())
        ]
        if missing:
            result.outcome, result.reason = "wrong", f"no gradient reaches {missing[0]}"
            return result
        sparse.eval()
        if flops:
            dense_macs = profile(dense, x[:1]).gmacs
            sparse_macs = profile(sparse, x[:1]).gmacs
            result.macs_ratio = sparse_macs / dense_macs
            if result.macs_ratio >= 1.0:
                result.outcome, result.reason = "costlier", f"{sparse_macs:.3f} vs {dense_macs:.3f} GMACs"
                return result
        result.outcome = "works"
    except TokenPruneError as e:
        result.outcome, result.reason = "refused", str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a crash is what this check exists to find
        result.outcome, result.reason = "crash", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        result.seconds = time.perf_counter() - start
    return result
