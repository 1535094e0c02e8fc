"""Predictor warm start (issue #13): learned predictors trained to reproduce the attention scorer's decisions."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import tokenprune
from tokenprune import ConfigError
from tokenprune.train import finetune, load_recipe
from tokenprune.train.distributed import DistInfo
from tokenprune.train.warmstart import _agreement, warm_start


def _batches(n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n)]


@pytest.mark.slow
def test_warm_start_teaches_the_predictors_the_attention_ranking_and_leaves_the_backbone():
    torch.manual_seed(0)
    teacher = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=4, depth=4).eval()
    student = tokenprune.sparsify(teacher, 0.7, example_inputs=torch.randn(1, 3, 32, 32))
    backbone = {k: v.clone() for k, v in student.state_dict().items() if "tokenprune" not in k}
    info = DistInfo()
    before = warm_start(student, teacher, _batches(1), steps=1, lr=0.0, info=info)["agreement"]
    log = []
    after = warm_start(student, teacher, _batches(), steps=60, lr=1e-2, info=info, log=lambda s, v: log.append(v))
    # 16 patches, stage 0 keeps 11: chance agreement is about 11/16; imitation has to beat it clearly
    assert before < 0.8 and after["agreement"] > 0.9, (before, after)
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in backbone.items())


def test_agreement_counts_the_guides_kept_tokens_the_predictor_also_keeps():
    log_probs = torch.tensor([[0.9, 0.8, 0.1, 0.2]]).log().unsqueeze(-1).expand(-1, -1, 2).clone()
    guide = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).unsqueeze(-1)
    assert _agreement(log_probs, guide, None) == 0.5  # predictor keeps tokens 0, 1; guide 0, 2


@pytest.mark.slow  # over 2 s on 2 cores: the full run covers it, the inner loop (-m 'not slow') skips it
def test_harness_runs_the_warm_start_before_fine_tuning(tmp_path):
    common = ["data.source=synthetic", "data.synthetic_size=32", "data.num_classes=10", "data.workers=0",
              "optim.batch_size=8", "optim.epochs=1", "run.device=cpu", "run.threads=1",
              "model.name=deit_tiny_patch16_224",
              "model.kwargs={img_size: 32, patch_size: 4, depth: 4, num_classes: 10}", "sparsify.locations=[1,2,3]",
              "model.checkpoint=null", "model.pretrained=false"]  # fmt: skip
    finetune(None, overrides=[*common, "sparsify.enabled=false", f"run.output_dir={tmp_path / 't'}"])
    finetune(
        None,
        overrides=[*common, f"model.checkpoint={tmp_path / 't' / 'final.pt'}", "sparsify.warm_start_steps=5",
                   f"run.output_dir={tmp_path / 's'}"],
    )  # fmt: skip
    lines = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    kinds = [line["kind"] for line in lines]
    assert kinds.index("warm_start") < kinds.index("train")
    assert [line["step"] for line in lines if line["kind"] == "warm_start"] == [5]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["sparsify.scorer=attention", "learned_ratios.enabled=true"], "no gradient"),
        (["sparsify.scorer=attention", "sparsify.warm_start_steps=10"], "there are none"),
        (["sparsify.warm_start_steps=-1"], ">= 0"),
        (["sparsify.scorer=random"], "'predictor', 'attention'"),
    ],
)
def test_recipe_refuses_combinations_that_cannot_work(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_recipe(None, overrides)
