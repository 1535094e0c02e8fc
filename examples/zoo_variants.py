"""Variants inside the zoo's families: a family's options and its other named models, checked as the zoo is.

The zoo (`zoo_coverage.py`) checks one model per family with its default options; a family's options change the code
the graph pass meets (no class token, registers, pooling heads, parallel blocks, gated MLPs, a ConvNeXt without layer
scale). Each variant here is built with timm's own constructor (some options are classes, which a saved tokenprune
model could not record) and checked by `zoo_harness.check_model` in a process of its own: works, or refused with a
reason; never wrong, crashed or costlier. Prints one line per variant and a summary; exits 1 on any of the three.

    python examples/zoo_variants.py --jobs 2           # ~10 min on 2 CPU cores
    python examples/zoo_variants.py --only "qk norm,dinov3"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm.layers as layers
from timm.models import vision_transformer as vit
from zoo_coverage import ROOT, check_entries, select
from zoo_harness import _e, build_with_timm

SMALL = dict(img_size=64, depth=4)
_VIT = "vit_tiny_patch16_224"

#: VisionTransformer's options, one at a time, on ViT-Ti (64 px, 4 blocks).
OPTIONS = [
    _e("no class token, avg pool", _VIT, class_token=False, global_pool="avg", **SMALL),
    _e("registers, no class token", _VIT, class_token=False, reg_tokens=4, global_pool="avg", **SMALL),
    _e("register, MAP head", _VIT, reg_tokens=1, global_pool="map", **SMALL),
    _e("avgmax pool", _VIT, global_pool="avgmax", **SMALL),
    _e("max pool", _VIT, global_pool="max", **SMALL),
    _e("prr pool", _VIT, global_pool="prr", **SMALL),
    _e("pool with prefix", _VIT, global_pool="avg", pool_include_prefix=True, **SMALL),
    _e("qk norm", _VIT, qk_norm=True, **SMALL),
    _e("scale norms", _VIT, scale_attn_norm=True, scale_mlp_norm=True, **SMALL),
    _e("layer scale 1", _VIT, init_values=1.0, **SMALL),
    _e("no_embed_class", _VIT, no_embed_class=True, **SMALL),
    _e("no position embedding", _VIT, pos_embed="none", **SMALL),
    _e("dynamic image size", _VIT, dynamic_img_size=True, **SMALL),
    _e("pre-norm", _VIT, pre_norm=True, **SMALL),
    _e("no final norm", _VIT, final_norm=False, global_pool="avg", fc_norm=False, **SMALL),
    _e("parallel scaling block", _VIT, block_fn=vit.ParallelScalingBlock, **SMALL),
    _e("parallel things block", _VIT, block_fn=vit.ParallelThingsBlock, **SMALL),
    _e("res-post block", _VIT, block_fn=vit.ResPostBlock, **SMALL),
    _e("diff parallel scaling block", _VIT, block_fn=vit.DiffParallelScalingBlock, **SMALL),
    _e("diff attention", _VIT, attn_layer="diff", **SMALL),
    _e("SwiGLU", _VIT, mlp_layer=layers.SwiGLU, **SMALL),
    _e("GluMlp", _VIT, mlp_layer=layers.GluMlp, act_layer="sigmoid", **SMALL),
    _e("RMSNorm", _VIT, norm_layer="rmsnorm", **SMALL),
    _e("embedding norm", _VIT, embed_norm_layer="layernorm", **SMALL),
    _e("patch dropout", _VIT, patch_drop_rate=0.5, **SMALL),
    _e("drop path", _VIT, drop_path_rate=0.3, **SMALL),
    _e("position and projection dropout", _VIT, pos_drop_rate=0.3, proj_drop_rate=0.1, **SMALL),
]

#: Other named models of the zoo's families.
NAMED = [
    _e("so150m", "vit_so150m_patch16_reg4_gap_256", **SMALL),
    _e("little (sbb)", "vit_little_patch16_reg1_gap_256", **SMALL),
    _e("18x2 parallel", "vit_small_patch16_18x2_224", **SMALL),
    _e("PE core", "vit_pe_core_tiny_patch16_384", **SMALL),
    _e("InternViT", "vit_intern300m_patch14_448", img_size=56, depth=4),
    _e("AIMv2", "aimv2_large_patch14_224", img_size=56, depth=4),
    _e("betwixt", "vit_betwixt_patch16_reg4_gap_256", **SMALL),
    _e("EVA-02 L", "eva02_large_patch14_224", img_size=56, depth=4),
    _e("EVA giant", "eva_giant_patch14_224", img_size=56, depth=4),
    _e("rope mixed", "vit_small_patch16_rope_mixed_224", **SMALL),
    _e("rope + APE", "vit_small_patch16_rope_ape_224", **SMALL),
    _e("rope mixed + APE", "vit_base_patch16_rope_mixed_ape_224", **SMALL),
    _e("rope, register, gap", "vit_base_patch16_rope_reg1_gap_256", **SMALL),
    _e("srelpos", "vit_srelpos_small_patch16_224", **SMALL),
    _e("relpos cls-gap", "vit_relpos_base_patch16_clsgap_224", **SMALL),
    _e("relpos rpn", "vit_base_patch16_rpn_224", **SMALL),
    _e("DINOv3 S", "vit_small_patch16_dinov3", **SMALL),
    _e("DINOv3 B qkv bias", "vit_base_patch16_dinov3_qkvb", **SMALL),
    _e("NaFlexViT MAP", "naflexvit_base_patch16_map", **SMALL),
    _e("NaFlexViT parallel gap", "naflexvit_base_patch16_par_gap", **SMALL),
    _e("NaFlexViT SigLIP", "naflexvit_base_patch16_siglip", **SMALL),
    _e("NaFlexViT RADIO v3", "naflexvit_base_patch16_radio_v3", **SMALL),
    _e("BEiT3", "beit3_base_patch16_224", **SMALL),
    _e("SigLIP gap", "vit_base_patch16_siglip_gap_224", **SMALL),
    _e("SO400M SigLIP", "vit_so400m_patch14_siglip_378", img_size=56, depth=4),
    _e("CLIP quickgelu", "vit_base_patch16_clip_quickgelu_224", **SMALL),
    _e("ViT plus", "vit_base_patch32_plus_256", **SMALL),
    _e("DeiT3 layer scale 1", "deit3_small_patch16_224", init_values=1.0, **SMALL),
    _e("BEiTv2 layer scale 1", "beitv2_base_patch16_224", init_values=1.0, **SMALL),
    _e("CaiT layer scale 1", "cait_xxs24_224", init_values=1.0, **SMALL),
    _e("CaiT S24", "cait_s24_224", **SMALL),
    _e("ViTamin", "vitamin_small_224", img_size=64),
    _e("ConvNeXt OLS stem", "convnext_atto_ols"),
    _e("ConvNeXt RMS OLS", "convnext_zepto_rms_ols"),
    _e("ConvNeXt conv MLP", "convnext_atto", conv_mlp=True),
    _e("ConvNeXt layer scale 1", "convnext_atto", ls_init_value=1.0),
    _e("ConvNeXt no layer scale", "convnext_atto", ls_init_value=None),
    _e("ConvNeXt head norm first", "convnext_atto", head_norm_first=True),
    _e("ConvNeXt V2 channels-last MLP", "convnextv2_atto", conv_mlp=False),
    _e("ConvNeXt V2 tiny", "convnextv2_tiny"),
    _e("Swin S3", "swin_s3_tiny_224"),
    _e("Swin-V2 CR norm stages", "swinv2_cr_tiny_ns_224"),
    _e("Hiera abswin", "hiera_small_abswin_256"),
    _e("FastViT MCI0", "fastvit_mci0"),
    _e("FastViT SA12", "fastvit_sa12"),
    _e("FocalNet LRF", "focalnet_tiny_lrf"),
    _e("MambaOut kobe", "mambaout_kobe"),
    _e("CAFormer S36", "caformer_s36"),
    _e("MaxViT pico", "maxvit_pico_rw_256"),
    _e("MaxViT tiny pm", "maxvit_tiny_pm_256"),
    _e("MaxxViT rmlp nano", "maxxvit_rmlp_nano_rw_256"),
    _e("MaxxViT-V2 nano", "maxxvitv2_nano_rw_256"),
    _e("DaViT small", "davit_small"),
    _e("TinyViT 21M", "tiny_vit_21m_224"),  # one window per block in the chain (14 x 14 map, window 14)
    _e("TinyViT 21M 384", "tiny_vit_21m_384"),  # the same branch at 384 px (24 x 24 map, window 24)
]

BAD = ("wrong", "crash", "costlier", "timeout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated variant labels or model names")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per variant")
    parser.add_argument("--jobs", type=int, default=1, help="variants checked at once (one process and thread each)")
    parser.add_argument("--jsonl", default=str(ROOT / "runs" / "zoo_variants.jsonl"))
    args = parser.parse_args(argv)
    entries = select(OPTIONS + NAMED, args.only)
    rows = check_entries(entries, Path(args.jsonl), jobs=args.jobs, timeout=args.timeout, build=build_with_timm)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(entries)})")
    return 1 if any(counts.get(b) for b in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
